import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
# Test files that compare no floats against recorded fixtures: .ci/run runs the others again on other kernel paths.
NOT_NUMERIC = {"test_cli.py", "test_bad_input.py", "test_weights.py", "test_train.py", "test_scenes.py",
               "test_convert.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "numeric: compares floats with a reference (run again by .ci/run on other "
                                       "kernel paths: SSE4, AVX2, AVX-512 without bf16, MKL_CBWR=COMPATIBLE)")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name not in NOT_NUMERIC:
            item.add_marker(pytest.mark.numeric)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two fighting over small kernels, and results do not depend on it."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _cache_home(tmp_path_factory):
    """sdlite's cache (model hashes) in a temporary folder, for this process and the CLI subprocesses it starts."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> Path:
    """Tokenizer folders written by transformers: sd1/, sd2/ (tokenizer.json) and sd1_legacy/, sd2_legacy/
    (the Hub's vocab.json + merges.txt), unpacked from make_text.py's archive."""
    root = tmp_path_factory.mktemp("tokenizers")
    with tarfile.open(FIXTURES / "tokenizer_folders.tar.xz") as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, folders) -> Path:
    """The random-weight checkpoints that make_pipelines.py wrote with diffusers/transformers in both official
    layouts (sd1/ and sd2/ diffusers folders, sd1.safetensors and sd2.safetensors single files), unpacked from the
    zip they are committed in. The folders' tokenizer/ is the tokenizer fixture's own (sd1/ and sd2_legacy/)."""
    where = tmp_path_factory.mktemp("checkpoints")
    with zipfile.ZipFile(FIXTURES / "pipelines" / "checkpoints.zip") as z:
        z.extractall(where)
    shutil.copytree(folders / "sd1", where / "sd1" / "tokenizer")
    shutil.copytree(folders / "sd2_legacy", where / "sd2" / "tokenizer")
    return where
