"""Shared test fixtures: a tiny offline tokenizer and tiny model configs.

Every test runs offline (the Hugging Face Hub is unreachable here); the environment variables
are set before transformers/datasets are imported so no test waits on network retries.
"""

import os
import string
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models are dominated by per-op overhead: one intra-op thread avoids OpenMP spin-waiting on the
# 2 shared cores (measured 20x slower steps with two threads). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


# `make test` runs three pytest-xdist workers (Makefile's TEST_WORKERS) with `--dist loadfile`: each module's tests stay on one worker, so a
# module- or session-scoped fixture (a finished run, a Slurm cluster) is built once. (`--dist loadgroup` would
# let the slowest tests run apart, but pytest-xdist 3.8 cannot rename pytest 9's test ids, so it groups
# nothing.) Each worker schedules the slowest modules first, so that the workers finish at about the same time.
SLOWEST_MODULES = ("test_study.py", "test_slurm.py", "test_gpu_check.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker: every worker collects, in the same order
        first = {name: rank for rank, name in enumerate(SLOWEST_MODULES)}
        items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A test that calls a benchmark's main() sets torch's thread count; later in-process runs keep one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FIXTURE_WORDS = (
    "the a an of and to in is was for on that with as by it at from his her he she they "
    "this be are were or which not have has had their its but one two three first new after "
    "film game album song team season war city river king church music world year time "
    "good bad great movie story play love funny boring dull plot actor actors performance "
    "cat dog sat mat ran fast slow big small red blue john mary book read wrote saw"
).split()


def write_vocab_dir(directory: Path) -> Path:
    """Write a small uncased WordPiece vocabulary that `AutoTokenizer.from_pretrained` loads."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = (
        SPECIAL_TOKENS + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + FIXTURE_WORDS
    )
    seen: list[str] = []
    for token in tokens:
        if token not in seen:
            seen.append(token)
    (directory / "vocab.txt").write_text("\n".join(seen) + "\n")
    (directory / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "ElectraTokenizer", "do_lower_case": true, "model_max_length": 512}\n'
    )
    return directory


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory) -> Path:
    """Directory with a tiny vocabulary (about 200 tokens), loadable offline."""
    return write_vocab_dir(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def tokenizer(vocab_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(vocab_dir))


@pytest.fixture
def shared_data() -> Path:
    """The real data folder beside the repository; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
