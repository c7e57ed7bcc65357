"""Check the simulator's wire format with the official Together Python SDK (together==3.1.1).

Usage: contract.py BASE_URL SLOW_BASE_URL

BASE_URL is a simulator whose batches finish within seconds. SLOW_BASE_URL is a simulator whose
batches stay in progress, so that a cancel always finds a running batch. Either URL may end in
/v1: the SDK 3.1.1 puts /v1 (or /v2) into every path itself, so the script strips it.

Every call runs with strict response validation, so the SDK parses each response into its
declared pydantic type and raises when a required field is missing or has the wrong type. The
script exits with status 1 and a message naming the failed step on the first failure.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import together
from together.types import BatchJob, FileResponse

CHAT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
EMBEDDING_MODEL = "BAAI/bge-large-en-v1.5"
PROJECT_ID = "proj-simulator"
MAX_POLLS = 400
POLL_INTERVAL_SECS = 0.05


class ContractError(Exception):
    """A response that breaks the contract the SDK expects."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ContractError(message)


def client_for(base_url: str) -> together.Together:
    origin = base_url.rstrip("/").removesuffix("/v1")
    return together.Together(
        api_key="test",
        base_url=origin,
        max_retries=0,
        _strict_response_validation=True,
    )


def batch_input(prefix: str, count: int) -> str:
    lines = []
    for index in range(count):
        question = f"What is {index} + {index}?"
        lines.append(
            '{"custom_id": "%s-%d", "body": {"model": "%s", "max_tokens": 64, '
            '"messages": [{"role": "user", "content": "%s"}]}}' % (prefix, index, CHAT_MODEL, question)
        )
    return "\n".join(lines) + "\n"


def check_file(file: FileResponse, name: str, size: int) -> None:
    check(isinstance(file, FileResponse), f"expected a FileResponse, got {type(file).__name__}")
    check(file.id.startswith("file-"), f"file id {file.id!r} does not start with file-")
    check(file.filename == name, f"filename {file.filename!r}, expected {name!r}")
    check(file.bytes == size, f"bytes {file.bytes}, expected {size}")
    check(file.purpose == "batch-api", f"purpose {file.purpose!r}, expected 'batch-api'")
    check(file.file_type == "jsonl", f"FileType {file.file_type!r}, expected 'jsonl'")
    check(file.object == "file", f"object {file.object!r}, expected 'file'")
    check(file.created_at > 0, f"created_at {file.created_at} is not a Unix time")


def check_job(job: BatchJob | None, input_file_id: str) -> BatchJob:
    check(isinstance(job, BatchJob), f"expected a BatchJob, got {type(job).__name__}")
    assert job is not None
    check(bool(job.id), "the batch job has no id")
    check(job.input_file_id == input_file_id, f"input_file_id {job.input_file_id!r}, expected {input_file_id!r}")
    check(job.endpoint == "/v1/chat/completions", f"endpoint {job.endpoint!r}")
    check(job.status is not None, "the batch job has no status")
    check(job.created_at is not None, "created_at did not parse as a datetime")
    check(job.job_deadline is not None, "job_deadline did not parse as a datetime")
    check(job.progress is not None, "the batch job has no progress")
    return job


def upload(client: together.Together, directory: Path, name: str, content: str) -> FileResponse:
    path = directory / name
    path.write_text(content)
    file = client.files.upload(file=path, purpose="batch-api", check=False)
    check_file(file, name, len(content.encode()))
    return file


def files_round_trip(client: together.Together, directory: Path) -> None:
    content = batch_input("files", 3)
    uploaded = upload(client, directory, "files.jsonl", content)

    retrieved = client.files.retrieve(uploaded.id)
    check_file(retrieved, "files.jsonl", len(content.encode()))
    check(retrieved.processing_status == "COMPLETED", f"processing_status {retrieved.processing_status!r}")

    downloaded = client.files.content(uploaded.id).read()
    check(downloaded == content.encode(), "files.content returned other bytes than were uploaded")

    # The same bytes again get a 409 with the existing file id, which the SDK turns into a
    # retrieve of that file.
    again = upload(client, directory, "files.jsonl", content)
    check(again.id == uploaded.id, f"a repeated upload returned {again.id}, expected {uploaded.id}")

    listed = client.files.list()
    check(any(file.id == uploaded.id for file in listed.data), "files.list lacks the uploaded file")

    deleted = client.files.delete(uploaded.id)
    check(deleted.id == uploaded.id, f"files.delete returned id {deleted.id!r}")
    check(deleted.deleted is True, f"files.delete returned deleted={deleted.deleted!r}")
    try:
        client.files.retrieve(uploaded.id)
    except together.NotFoundError:
        pass
    else:
        raise ContractError("a deleted file can still be retrieved")


def batch_completes(client: together.Together, directory: Path) -> None:
    uploaded = upload(client, directory, "batch.jsonl", batch_input("batch", 4))
    created = client.batches.create(
        endpoint="/v1/chat/completions", input_file_id=uploaded.id, completion_window="24h"
    )
    job = check_job(created.job, uploaded.id)
    check(job.x_model_id == CHAT_MODEL, f"model_id {job.x_model_id!r}, expected {CHAT_MODEL!r}")

    for _ in range(MAX_POLLS):
        job = check_job(client.batches.retrieve(job.id), uploaded.id)
        if job.status not in ("VALIDATING", "IN_PROGRESS"):
            break
        time.sleep(POLL_INTERVAL_SECS)
    check(job.status == "COMPLETED", f"batch ended {job.status!r} ({job.error!r}), expected COMPLETED")
    check(job.progress == 100.0, f"progress {job.progress}, expected 100")
    check(job.completed_at is not None, "a completed batch has no completed_at")
    check(bool(job.output_file_id), "a completed batch has no output_file_id")
    assert job.output_file_id is not None

    output = client.files.content(job.output_file_id).read().decode()
    custom_ids = sorted(line.split('"custom_id":"')[1].split('"')[0] for line in output.splitlines())
    check(custom_ids == [f"batch-{i}" for i in range(4)], f"output custom_ids {custom_ids}")

    listed = client.batches.list()
    check(any(item.id == job.id for item in listed), "batches.list lacks the batch")
    for item in listed:
        check(isinstance(item, BatchJob), f"batches.list returned a {type(item).__name__}")


def batch_cancels(slow_client: together.Together, directory: Path) -> None:
    uploaded = upload(slow_client, directory, "cancel.jsonl", batch_input("cancel", 2))
    created = slow_client.batches.create(endpoint="/v1/chat/completions", input_file_id=uploaded.id)
    job = check_job(created.job, uploaded.id)
    cancelled = check_job(slow_client.batches.cancel(job.id), uploaded.id)
    check(cancelled.status == "CANCELLED", f"cancel returned status {cancelled.status!r}")
    check(cancelled.completed_at is not None, "a cancelled batch has no completed_at")


def chat(client: together.Together) -> None:
    completion = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "How many legs has a spider?"}],
        max_tokens=32,
    )
    check(completion.object == "chat.completion", f"object {completion.object!r}")
    check(completion.model == CHAT_MODEL, f"model {completion.model!r}")
    check(len(completion.choices) == 1, f"{len(completion.choices)} choices")
    message = completion.choices[0].message
    check(message is not None and message.role == "assistant", "the choice has no assistant message")
    assert message is not None and message.content is not None
    check(message.content.startswith("How many legs has a spider?"), f"content {message.content!r}")
    check(completion.choices[0].finish_reason == "stop", "finish_reason is not stop")
    usage = completion.usage
    check(usage is not None, "the completion has no usage")
    assert usage is not None
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, "usage does not add up")


def embeddings(client: together.Together) -> None:
    response = client.embeddings.create(model=EMBEDDING_MODEL, input=["first", "second"])
    check(response.object == "list", f"object {response.object!r}")
    check(response.model == EMBEDDING_MODEL, f"model {response.model!r}")
    check([item.index for item in response.data] == [0, 1], "embedding indexes are not 0 and 1")
    check(all(item.object == "embedding" for item in response.data), "an item is not an embedding")
    check(all(len(item.embedding) > 0 for item in response.data), "an embedding is empty")


def models(client: together.Together) -> None:
    # In SDK 3.1.1 `models.list` lists a project's custom models; the simulator has none.
    page = client.models.list(project_id=PROJECT_ID)
    check(list(page) == [], "models.list returned custom models")

    # The catalogue of hosted models is `models.list_supported`.
    supported = list(client.models.list_supported(product="PRODUCT_SERVERLESS"))
    ids = [model.id for model in supported]
    check(CHAT_MODEL in ids, f"models.list_supported lacks {CHAT_MODEL}: {ids}")
    chat_model = next(model for model in supported if model.id == CHAT_MODEL)
    check(chat_model.capabilities == ["CAPABILITY_CHAT"], f"capabilities {chat_model.capabilities}")
    check(chat_model.display_name != "", "the model has no display name")

    first_page = client.models.list_supported(limit=2)
    check([model.id for model in first_page.data] == ids[:2], "the first page of 2 differs")
    check(first_page.next_cursor == ids[1], f"next_cursor {first_page.next_cursor!r}, expected {ids[1]!r}")
    # Iterating a page follows `next_cursor` through every later page.
    paged_ids = [model.id for model in first_page]
    check(paged_ids == ids, f"paging returned {paged_ids}, expected {ids}")


@dataclass
class Context:
    client: together.Together
    slow_client: together.Together
    directory: Path


STEPS: list[tuple[str, Callable[[Context], None]]] = [
    ("files upload, retrieve, content, list and delete", lambda c: files_round_trip(c.client, c.directory)),
    ("batch create, retrieve until COMPLETED, and list", lambda c: batch_completes(c.client, c.directory)),
    ("batch cancel", lambda c: batch_cancels(c.slow_client, c.directory)),
    ("chat.completions.create", lambda c: chat(c.client)),
    ("embeddings.create", lambda c: embeddings(c.client)),
    ("models.list and models.list_supported", lambda c: models(c.client)),
]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: contract.py BASE_URL SLOW_BASE_URL", file=sys.stderr)
        return 2
    print(f"together SDK {together.__version__}")
    with tempfile.TemporaryDirectory() as temp:
        context = Context(client_for(argv[1]), client_for(argv[2]), Path(temp))
        for name, step in STEPS:
            try:
                step(context)
            except Exception as error:  # noqa: BLE001 - every failure of a step is reported alike
                print(f"FAILED {name}: {type(error).__name__}: {error}", file=sys.stderr)
                return 1
            print(f"ok {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
