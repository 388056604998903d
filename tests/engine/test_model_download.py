"""Downloads into a folder that pods share (model_store.download_once, `sarathi model download`):
one downloader at a time, a completed download never repeated, a failed one resumed."""

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sarathi_engine.model_store import DOWNLOADED_MARKER, download_once


def slow_fetch(repo: str, folder: Path) -> None:
    """Stands in for the Hub: notes each call, and is slow enough for a rival to arrive meanwhile."""
    with open(folder.parent / "fetches", "a") as log:
        log.write(f"{os.getpid()} start\n")
    time.sleep(0.5)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    with open(folder.parent / "fetches", "a") as log:
        log.write(f"{os.getpid()} end\n")


def _download(folder: str, results) -> None:
    results.put(download_once("org/model", Path(folder), slow_fetch))


def test_two_downloaders_of_one_folder_fetch_once(tmp_path):
    folder = tmp_path / "org" / "model"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    rivals = [context.Process(target=_download, args=(str(folder), results)) for _ in range(2)]
    for p in rivals:
        p.start()
    for p in rivals:
        p.join(30)
    assert sorted(results.get(timeout=5) for _ in rivals) == [False, True]
    assert [line.split()[1] for line in (folder.parent / "fetches").read_text().splitlines()] == ["start", "end"]
    assert (folder / DOWNLOADED_MARKER).read_text() == "org/model\n"


def test_a_failed_download_leaves_no_marker_and_the_next_resumes(tmp_path):
    folder = tmp_path / "model"

    def broken(repo, target):
        target.mkdir()
        (target / "part").write_text("half")
        raise subprocess.CalledProcessError(1, ["hf", "download", repo])

    with pytest.raises(subprocess.CalledProcessError):
        download_once("org/model", folder, broken)
    assert not (folder / DOWNLOADED_MARKER).exists()
    seen = []
    assert download_once("org/model", folder, lambda repo, target: seen.append((target / "part").read_text()))
    assert seen == ["half"], "the next download starts from what the failed one left"
    assert not download_once("org/model", folder, lambda *_: pytest.fail("downloaded twice"))


def test_the_cli_downloads_through_the_hf_command_once(tmp_path):
    """A fake `hf` command (it copies nothing from the network: it writes a config and notes its
    arguments) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_hf = bin_dir / "hf"
    fake_hf.write_text("#!/bin/sh\n"
                       f"echo \"$@\" >> {tmp_path}/calls\n"
                       "mkdir -p \"$4\" && echo '{}' > \"$4/config.json\"\n")
    fake_hf.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    target = tmp_path / "models" / "org" / "model"
    command = [sys.executable, "-m", "sarathi_engine.cli", "model", "download", "org/model", "--local-dir", str(target)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    second = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert f"downloaded into {target}" in first.stdout and f"already in {target}" in second.stdout
    assert (tmp_path / "calls").read_text() == f"download org/model --local-dir {target}\n"
    assert (target / "config.json").is_file()

    missing = subprocess.run(command[:-2], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "--local-dir" in missing.stderr
