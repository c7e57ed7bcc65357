//! Reading a file line by line with a cap on line length, so that memory stays bounded by the
//! longest allowed line whatever the file holds.

use std::path::Path;

use async_compression::tokio::bufread::GzipDecoder;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// Read buffer for input files.
const READ_BUFFER: usize = 64 * 1024;

/// True for input files stored gzip-compressed.
pub fn is_gzip(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "gz")
}

/// Opens an input file for line reading, decompressing a `*.gz` file as it is read.
pub async fn open_input(path: &Path) -> std::io::Result<Box<dyn AsyncBufRead + Unpin + Send>> {
    let file = BufReader::with_capacity(READ_BUFFER, tokio::fs::File::open(path).await?);
    if !is_gzip(path) {
        return Ok(Box::new(file));
    }
    let mut decoder = GzipDecoder::new(file);
    // `gzip -c a b > ab.gz` and parallel compressors write several members; read them all.
    decoder.multiple_members(true);
    Ok(Box::new(BufReader::with_capacity(READ_BUFFER, decoder)))
}

/// One line as read: its 1-based number and bytes without the line ending.
#[derive(Debug)]
pub struct Line<'a> {
    pub number: u64,
    pub bytes: &'a [u8],
    /// True when the line was longer than the cap; `bytes` then holds only its start.
    pub too_long: bool,
}

/// Splits a reader into lines of at most `max_bytes` bytes, ending at `\n` (a `\r` before it
/// is dropped). A UTF-8 byte-order mark at the start of the file is skipped. The SHA-256 of
/// every byte read, line endings included, is kept for [`LineReader::sha256`].
pub struct LineReader<R> {
    reader: R,
    buf: Vec<u8>,
    max_bytes: usize,
    number: u64,
    bytes_read: u64,
    hasher: Sha256,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub fn new(reader: R, max_bytes: usize) -> Self {
        LineReader {
            reader,
            buf: Vec::new(),
            max_bytes,
            number: 0,
            bytes_read: 0,
            hasher: Sha256::new(),
        }
    }

    /// Returns the hex SHA-256 of all bytes read so far.
    pub fn sha256(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Returns how many bytes were read so far, line endings included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Reads the next line, or `None` at the end of the file.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line<'_>>> {
        self.buf.clear();
        let mut too_long = false;
        let mut saw_any = false;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                break;
            }
            saw_any = true;
            let (chunk, found_end) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], true),
                None => (available, false),
            };
            let room = (self.max_bytes + 1).saturating_sub(self.buf.len());
            if chunk.len() > room {
                too_long = true;
            }
            self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            let used = chunk.len() + usize::from(found_end);
            self.hasher.update(&available[..used]);
            self.bytes_read += used as u64;
            self.reader.consume(used);
            if found_end {
                break;
            }
        }
        if !saw_any {
            return Ok(None);
        }
        self.number += 1;
        if self.number == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
            self.buf.drain(..3);
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        if self.buf.len() > self.max_bytes {
            too_long = true;
            self.buf.truncate(self.max_bytes);
        }
        Ok(Some(Line {
            number: self.number,
            bytes: &self.buf,
            too_long,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(data: &[u8], capacity: usize, max: usize) -> Vec<(u64, Vec<u8>, bool)> {
        let reader = tokio::io::BufReader::with_capacity(capacity, data);
        let mut lines = LineReader::new(reader, max);
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            out.push((line.number, line.bytes.to_vec(), line.too_long));
        }
        out
    }

    #[tokio::test]
    async fn lines_are_identical_for_any_buffer_size() {
        let data = b"\xEF\xBB\xBFfirst\r\nsecond\n\nlast";
        let expected = vec![
            (1, b"first".to_vec(), false),
            (2, b"second".to_vec(), false),
            (3, b"".to_vec(), false),
            (4, b"last".to_vec(), false),
        ];
        for capacity in [1, 2, 64] {
            assert_eq!(
                read_all(data, capacity, 100).await,
                expected,
                "capacity {capacity}"
            );
        }
    }

    #[tokio::test]
    async fn long_line_is_flagged_and_cut() {
        let lines = read_all(b"0123456789\nok\n", 2, 4).await;
        assert_eq!(lines[0], (1, b"0123".to_vec(), true));
        assert_eq!(lines[1], (2, b"ok".to_vec(), false));
    }
}
