"""Hub models without a hub: a Hugging Face hub cache made from local checkpoints, and
mergekit's commands run against it with no network."""

from __future__ import annotations

import os
import subprocess
import sys

# mergekit 0.1.5 lists a hub model's files online even where the model is cached
# (ModelReference.local_path calls list_repo_files): answered from the cache here, as a
# reachable hub would answer
_HUB_ANSWERS = """
import os, sys
import huggingface_hub

def list_repo_files(repo_id, revision=None, repo_type=None, **kwargs):
    folder = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
    return [os.path.relpath(os.path.join(r, f), folder) for r, _, files in os.walk(folder) for f in files]

huggingface_hub.list_repo_files = list_repo_files
"""
_MAIN = {
    "mergekit-yaml": "from mergekit.scripts.run_yaml import main\nmain(sys.argv[1:])\n",
    "mergekit-metagpt": "from mergekit_metagpt.cli import main\nsys.exit(main(sys.argv[1:]))\n",
}


def hub_snapshot(hub_cache: str, repo_id: str, folder: str, commit: str, branch: str = "main") -> str:
    """Put the checkpoint in `folder` into a Hugging Face hub cache as `repo_id` at `commit`
    (blobs named by content, the snapshot's files linked to them, `branch` pointing at the
    commit), as huggingface_hub lays out a download; returns the snapshot folder."""
    import hashlib

    repo = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    with open(os.path.join(repo, "refs", branch), "w") as f:
        f.write(commit)
    return snapshot


def run_offline(command: str, args, cache: str, env=None, hub_lists_files: bool = True, **kwargs):
    """`command` (mergekit-yaml, mergekit-metagpt) with the hub cache `cache`, HF_HUB_OFFLINE=1;
    `hub_lists_files`: as if the hub answered mergekit's request for a model's list of files."""
    environment = dict(os.environ, HF_HUB_CACHE=cache, HF_HUB_OFFLINE="1", **(env or {}))
    started = ([sys.executable, "-c", _HUB_ANSWERS + _MAIN[command]] if hub_lists_files
               else [os.path.join(os.path.dirname(sys.executable), command)])
    return subprocess.run([*started, *args], capture_output=True, text=True, timeout=600, env=environment,
                          **kwargs)
