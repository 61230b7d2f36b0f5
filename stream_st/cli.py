"""``stream-st``: inspect, load and demo safetensors checkpoints at URLs."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import __version__

EXAMPLES = {
    "inspect": "stream-st inspect https://host/model.safetensors\n  stream-st inspect --json s3://bucket/model.safetensors",
    "load": "stream-st load https://host/model.safetensors --select 'model.layers.0.*' --dtype f16",
    "demo": "stream-st demo",
}


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"storage_options": json.loads(args.storage_options)} if args.storage_options else {}


def cmd_inspect(args: argparse.Namespace) -> int:
    from .api import read_header

    header = read_header(args.url, **_options(args))
    if args.json:
        print(
            json.dumps(
                {
                    "url": header.url,
                    "file_size": header.file_size,
                    "header_size": header.header_size,
                    "metadata": header.metadata,
                    "tensors": [
                        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offsets": [t.start, t.end]}
                        for t in header
                    ],
                },
                indent=2,
            )
        )
        return 0
    width = max((len(t.name) for t in header), default=4)
    print(f"{'name':<{width}}  {'dtype':<8} {'shape':<22} {'bytes':>12}  offsets")
    for t in header:
        print(f"{t.name:<{width}}  {t.dtype:<8} {str(list(t.shape)):<22} {t.nbytes:>12}  [{t.start}, {t.end})")
    print(
        f"\n{len(header)} tensors, {_size(header.data_size)} of data, header {header.header_size} bytes, "
        f"object {_size(header.file_size)}"
    )
    if header.metadata:
        print("metadata: " + json.dumps(header.metadata))
    return 0


async def _timed_load(
    url: str, selection: list[str] | None, dtype: Any, device: str, storage_options: dict[str, Any] | None
) -> dict[str, Any]:
    """Load and report what it cost: seconds, bytes, requests, time to first tensor."""
    from .api import finish, open_remote
    from .config import Config
    from .select import select

    config = Config.from_env()
    started = time.perf_counter()
    async with open_remote(url, config, storage_options) as file:
        header_seconds = time.perf_counter() - started
        names = select(file.header.offset_keys(), selection, url=file.url)
        hosts = await file.load((name, None) for name in names)
        tensors = {name: finish(hosts.pop(name), device, dtype) for name in names}
        stats = file.engine.stats
    seconds = time.perf_counter() - started
    return {
        "tensors": tensors,
        "seconds": seconds,
        "header_seconds": header_seconds,
        "bytes": stats.bytes,
        "requests": stats.requests,
        "retries": stats.retries,
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }


def _print_report(report: dict[str, Any]) -> None:
    seconds = report["seconds"]
    print(
        f"loaded {len(report['tensors'])} tensors, {_size(report['tensor_bytes'])} in {seconds:.3f} s "
        f"({report['bytes'] / seconds / 1e9:.2f} GB/s on the wire); {report['requests']} requests, "
        f"{_size(report['bytes'])} pulled, {report['retries']} retries; "
        f"header in {report['header_seconds'] * 1e3:.1f} ms"
    )


_DTYPES = {"f16": "float16", "fp16": "float16", "bf16": "bfloat16", "f32": "float32", "fp32": "float32"}


def cmd_load(args: argparse.Namespace) -> int:
    import torch

    dtype = getattr(torch, _DTYPES.get(args.dtype, args.dtype)) if args.dtype else None
    report = asyncio.run(_timed_load(args.url, args.select, dtype, args.device, _options(args).get("storage_options")))
    _print_report(report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import safetensors.torch
    import torch

    from .demo import demo_url

    with demo_url() as (url, path):
        print(f"demo checkpoint: {_size(path.stat().st_size)} served at {url}")
        report = asyncio.run(_timed_load(url, None, None, "cpu", None))
        _print_report(report)
        expected = safetensors.torch.load_file(str(path))
        same = (
            all(torch.equal(report["tensors"][n].view(torch.uint8), t.view(torch.uint8)) for n, t in expected.items())
            and report["tensors"].keys() == expected.keys()
        )
        print(f"bit-exact against safetensors.torch.load_file: {'yes' if same else 'NO'}")
        partial = asyncio.run(_timed_load(url, ["model.layers.1.*"], None, "cpu", None))
        print("partial load of model.layers.1.*: ", end="")
        _print_report(partial)
    return 0 if same else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-st", description="Stream safetensors checkpoints from URLs.")
    parser.add_argument("--version", action="version", version=f"stream-st {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawTextHelpFormatter,
        )
        if name != "demo":
            sub.add_argument("url", help="https://, s3://, gs://, hf://, file:// URL or a local path")
            sub.add_argument("--storage-options", help="JSON passed to fsspec (credentials, endpoint)")
        return sub

    inspect = command("inspect", "print the header: tensors, dtypes, shapes, offsets, metadata")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(run=cmd_inspect)
    load = command("load", "stream tensors and report bytes, requests, seconds and GB/s")
    load.add_argument("--select", action="append", help="name or glob of tensors to load (repeatable)")
    load.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    load.add_argument("--dtype", help="cast floating tensors: f16, bf16, f32")
    load.set_defaults(run=cmd_load)
    demo = command("demo", "serve a small checkpoint on 127.0.0.1, stream it, check it against safetensors")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"stream-st: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
