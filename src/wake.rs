//! Wake-up signals between stages.
//!
//! A stage that produced work (items stored, a batch packed, a batch finished) raises a signal;
//! every stage listening for it wakes once, even if it was busy when the signal was raised.
//! Each listener keeps its own cursor, so no wake-up is lost and none is stolen by another
//! listener. Stages still poll on a timer, so a signal only shortens a wait.

use tokio::sync::watch;

/// The raising side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Signal(watch::Sender<u64>);

/// One stage's view of a signal.
#[derive(Debug)]
pub struct Listener(watch::Receiver<u64>);

impl Signal {
    pub fn new() -> Self {
        Signal(watch::Sender::new(0))
    }

    /// Wakes every listener.
    pub fn raise(&self) {
        self.0
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    pub fn listen(&self) -> Listener {
        let mut receiver = self.0.subscribe();
        receiver.mark_unchanged();
        Listener(receiver)
    }
}

impl Default for Signal {
    fn default() -> Self {
        Self::new()
    }
}

impl Listener {
    /// Waits until the signal was raised since the last wait returned.
    pub async fn wait(&mut self) {
        if self.0.changed().await.is_err() {
            // Every sender is gone, so no wake-up can come: wait for cancellation instead.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn raise_before_wait_is_not_lost() {
        let signal = Signal::new();
        let mut first = signal.listen();
        let mut second = signal.listen();
        signal.raise();
        tokio::time::timeout(std::time::Duration::from_secs(5), first.wait())
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), second.wait())
            .await
            .unwrap();
    }
}
