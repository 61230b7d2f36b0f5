"""``stream-st download`` and ``stream-st cache ls | prune | rm``: the local cache from the command line."""

from __future__ import annotations

import argparse
import time
from typing import Any

_DOWNLOAD_EXAMPLE = (
    "stream-st download hf://org/repo                     # into $STREAM_ST_CACHE_DIR or ~/.cache/stream_st\n"
    "  stream-st download s3://bucket/model/ --cache-dir /nvme/cache --select 'model.layers.*'"
)
_CACHE_EXAMPLE = (
    "stream-st cache ls\n"
    "  stream-st cache prune --max-bytes 200000000000      # least recently used entries first\n"
    "  stream-st cache rm https://host/model.safetensors   # or --all"
)


def _store(args: argparse.Namespace, max_bytes: int | None = None) -> Any:
    from .cache import Store, cache_root
    from .config import Config

    return Store(cache_root(_folder(args, Config.from_env())), max_bytes)


def _folder(args: argparse.Namespace, config: Any) -> str:
    return str(args.cache_dir or config.cache_dir or "default")


def cmd_download(args: argparse.Namespace) -> int:
    import json

    from . import cache
    from .api import iter_tensors
    from .config import Config
    from .fetch import Stats

    config = Config.from_env()
    folder = _folder(args, config)
    options = json.loads(args.storage_options) if args.storage_options else None
    stats, started, count = Stats(), time.perf_counter(), 0
    for _name, _tensor in iter_tensors(
        args.url, tensors=args.select, storage_options=options, config=config, cache_dir=folder, stats=stats
    ):
        count += 1
    cache.wait_for_syncs()  # on disk for good before we say so
    seconds = time.perf_counter() - started
    print(f"{count} tensors in the cache {cache.cache_root(folder)}: {stats.bytes} bytes read in {seconds:.2f} s")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .config import Config

    if args.action == "ls":
        store = _store(args)
        entries = store.entries()
        for e in sorted(entries, key=lambda e: -e.last_used):
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            share = f"{100 * e.cached / e.size:.0f}%" if e.size else "100%"
            print(f"{e.disk:>14,} B  {share:>4} of {e.size:,} B  {used}  {e.url}  [{e.version}]")
        print(f"{len(entries)} entries, {sum(e.disk for e in entries):,} bytes on disk in {store.root}")
        return 0
    if args.action == "prune":
        cap = args.max_bytes if args.max_bytes is not None else Config.from_env().cache_max_bytes
        if cap is None:
            raise SystemExit("stream-st: error: cache prune needs --max-bytes (or STREAM_ST_CACHE_MAX_BYTES)")
        evicted = _store(args).prune(cap)
        print(f"evicted {evicted} entries")
        return 0
    from .cache import entry_key

    store = _store(args)
    if args.all:
        keys = [e.key for e in store.entries()]
    elif args.urls:
        keys = [entry_key(url, None)[0] for url in args.urls]
    else:
        raise SystemExit("stream-st: error: cache rm needs URLs or --all")
    print(f"removed {store.remove(keys)} entries")
    return 0


def register(commands: Any) -> None:
    """Add the subcommands to ``stream-st``'s parser."""
    download = _subcommand(
        commands,
        "download",
        "fill the local cache with a checkpoint ahead of time",
        "fill the local cache with a checkpoint ahead of time (its tensors are not kept in memory)",
        _DOWNLOAD_EXAMPLE,
    )
    download.add_argument("url", help="a file, index.json, folder or repo: https://, s3://, gs://, hf://")
    download.add_argument("--select", action="append", help="name or glob of tensors to cache (repeatable)")
    download.add_argument("--cache-dir", help="default: STREAM_ST_CACHE_DIR, else ~/.cache/stream_st")
    download.add_argument("--storage-options", help="JSON passed to fsspec (credentials, endpoint)")
    download.set_defaults(run=cmd_download)
    manage = _subcommand(
        commands,
        "cache",
        "list, prune or remove local cache entries",
        "list, prune (LRU, to a size) or remove local cache entries",
        _CACHE_EXAMPLE,
    )
    manage.add_argument("action", choices=["ls", "prune", "rm"])
    manage.add_argument("urls", nargs="*", help="rm: the URLs whose entries to remove")
    manage.add_argument("--all", action="store_true", help="rm: every entry")
    manage.add_argument("--max-bytes", type=int, help="prune: the size to evict down to")
    manage.add_argument("--cache-dir", help="default: STREAM_ST_CACHE_DIR, else ~/.cache/stream_st")
    manage.set_defaults(run=cmd_cache)


def _subcommand(commands: Any, name: str, help_text: str, description: str, example: str) -> Any:
    return commands.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawTextHelpFormatter,
    )
