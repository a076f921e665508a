"""Download the FineWeb-10B GPT-2 token shards from the Hugging Face hub.

    python data/cached_fineweb10B.py 9            # val + the first 9 train shards (~0.9B tokens)
    python data/cached_fineweb10B.py 103 --dir /big/disk/fineweb10B

Fetches fineweb_val_000000.bin and fineweb_train_000001.bin ... of the dataset kjj0/fineweb10B-gpt2.
A file already on disk whose header and size agree is skipped, so an interrupted run can simply be
started again; a corrupt one stays until its replacement has arrived. Every downloaded file is
checked the same way and deleted if it is corrupt. Set HF_ENDPOINT to use a mirror.
"""
import argparse
import os
import sys

import httpx2
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_gpt import ShardError, read_shard_header  # noqa: E402

REPO_ID = "kjj0/fineweb10B-gpt2"
REPO_TYPE = "dataset"
NUM_TRAIN_SHARDS = 103  # fineweb_train_000001.bin ... fineweb_train_000103.bin
DEFAULT_TRAIN_SHARDS = 9
DEFAULT_DIR = os.path.join(ROOT, "data", "fineweb10B")
VAL_FILE = "fineweb_val_000000.bin"


class DownloadError(Exception):
    """A download that cannot go on; the message says which file and why."""


def shard_names(num_train):
    return [VAL_FILE] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def have_shard(path):
    """True if `path` is a whole shard; a partial or corrupt one is kept (and replaced once the new one is in)."""
    if not os.path.exists(path):
        return False
    try:
        read_shard_header(path)
        return True
    except ShardError as e:
        print(f"{e}; downloading it again")
        return False


def describe_hub_error(name, error):
    """One line saying what went wrong talking to the hub, or None for errors that are not about the hub."""
    where = f"{constants.ENDPOINT} (dataset {REPO_ID})"
    if isinstance(error, RemoteEntryNotFoundError):
        return f"{name} is not on {where}: the hub answered 404"
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return f"the dataset {REPO_ID} was not found on {constants.ENDPOINT}"
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)):
        return f"cannot reach {where} to fetch {name}; are you offline? ({type(error).__name__})"
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        return f"the hub at {constants.ENDPOINT} failed on {name} with HTTP {status}"
    return None


def talk_to_hub(name, action):
    """Run `action` (a hub call about file `name`), turning the hub's failures into DownloadError."""
    try:
        return action()
    except Exception as error:
        message = describe_hub_error(name, error)
        if message is None:
            raise
        raise DownloadError(message) from None


def check_hub(name):
    """One quick HEAD request, so being offline fails at once instead of after the download retries."""
    url = hf_hub_url(REPO_ID, name, repo_type=REPO_TYPE)
    talk_to_hub(name, lambda: get_hf_file_metadata(url))


def download(name, folder):
    """Fetch one shard into `folder` and check it; a corrupt download is deleted.

    The hub client downloads into a side file and moves it over the old one at the end. Forced when a
    local file exists (it is corrupt, or it would have been skipped): the client would otherwise keep
    a file that the metadata of its earlier download vouches for."""
    forced = os.path.exists(os.path.join(folder, name))
    path = talk_to_hub(name, lambda: hf_hub_download(REPO_ID, name, repo_type=REPO_TYPE, local_dir=folder,
                                                     force_download=forced))
    try:
        return read_shard_header(path)
    except ShardError as e:
        os.remove(path)
        raise DownloadError(f"downloaded {name} is corrupt and was deleted: {e}") from None


def fetch_shards(num_train, folder):
    """Download what is missing of val + the first `num_train` train shards into `folder`."""
    names = shard_names(num_train)
    os.makedirs(folder, exist_ok=True)
    missing = [name for name in names if not have_shard(os.path.join(folder, name))]
    print(f"{len(names) - len(missing)} of {len(names)} shards already in {folder}")
    if missing:
        check_hub(missing[0])
    for i, name in enumerate(missing, 1):
        print(f"[{i}/{len(missing)}] {name}")
        tokens = download(name, folder)
        print(f"[{i}/{len(missing)}] {name}: {tokens:,} tokens")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "num_train", nargs="?", type=int, default=DEFAULT_TRAIN_SHARDS,
        help=f"how many train shards to fetch, 0..{NUM_TRAIN_SHARDS} (default {DEFAULT_TRAIN_SHARDS}); val is always fetched",
    )
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"where the shards go (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    if not 0 <= args.num_train <= NUM_TRAIN_SHARDS:
        parser.error(f"num_train must be between 0 and {NUM_TRAIN_SHARDS}, got {args.num_train}")
    try:
        fetch_shards(args.num_train, args.dir)
    except (DownloadError, OSError) as e:  # OSError: e.g. a --dir that cannot be written
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
