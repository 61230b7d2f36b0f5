"""Whole-process cloud load benchmark: stream_st against the usual S3 / GCS / Hub / Azure loaders on local servers.

    .venv/bin/python benchmarks/cloud.py [--size-gib 1.0] [--repeats 5] [--out benchmarks/out]
        [--servers localstack s3rver gcs hub azurite] [--repeats-for localstack=3] [--only stream_st raw ...]
        [--stream-st-ref HEAD]

One server at a time, on 127.0.0.1 (harness/servers.py): ``localstack`` (S3), ``s3rver`` (S3, npm, installed
into OUT/s3rver on first use), ``gcs`` (gcp-storage-emulator), ``hub`` (the Hub-compatible server, LFS files
redirected to its CDN) and ``azurite`` (Azure Blob; stream_st signs a SAS with the connection string's key,
adlfs and azure-storage-blob sign SharedKey requests). Each gets the checkpoint of harness/checkpoint.py;
every contender is checked once untimed (tensors bit for bit; the raw client's bytes against the file), then
timed in rotated rounds, each run a fresh process (harness/rounds.py). The children import stream_st from a
``git worktree`` checkout of ``--stream-st-ref`` (``worktree``: the live tree), so edits made while this runs
cannot change the code measured. Writes OUT/cloud_results.md and OUT/cloud_results.json.

Targets: on S3, stream_st within 1.10× of (Python+torch start + a raw ranged-GET client) on the same server,
and faster than runai-model-streamer in the same run.
"""

from __future__ import annotations

import contextlib
import http.client
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness, whatever the cwd

from harness import HARNESS, REPO, arguments, report, rounds, servers  # noqa: E402
from harness.checkpoint import Checkpoint, ensure_checkpoint  # noqa: E402
from harness.contenders import START, Contender  # noqa: E402
from harness.process import checkout, child_env, run_process  # noqa: E402

TARGET_VS_FLOOR = 1.10  # the project's S3 target: stream_st ≤ 1.10 × (start + raw ranged client)
BUCKET = "stream-st-bench"
RAW_THREADS = 8
RAW_PART = 16 << 20
SERVERS = ("localstack", "s3rver", "gcs", "hub", "azurite")
AZURE_CONCURRENCY = 8  # azure-storage-blob download_blob(max_concurrency=...)


def raw(what: str) -> Contender:
    """The ceiling: harness/raw_get.py on a ready URL (presigned, media, CDN or SAS)."""
    return Contender(
        "raw",
        f"raw ranged GETs: {RAW_THREADS} threads, http.client, 16 MiB, {what} URL",
        command=(sys.executable, str(HARNESS / "raw_get.py"), "{RAW_URL}", "{SIZE}", str(RAW_THREADS), str(RAW_PART)),
        check_args=("--check", "{LOCAL}"),
    )


def stream_st(scheme: str, fsspec_label: str) -> list[Contender]:
    load = "import stream_st\nsd = stream_st.load_file(URL, storage_options=SO, direct_http={})"
    return [
        Contender("stream_st", f"stream_st.load_file({scheme}://…, direct_http=True)", load.format(True)),
        Contender(
            "stream_st_fsspec",
            f"stream_st.load_file({scheme}://…, direct_http=False) ({fsspec_label})",
            load.format(False),
        ),
    ]


FSSPEC_READ = (  # s3fs / gcsfs, whichever the URL's scheme picks
    "import fsspec, safetensors.torch\n"
    "with fsspec.open(URL, 'rb', **SO) as f:\n    data = f.read()\n"
    "sd = safetensors.torch.load(data)"
)


def s3_contenders(server: Any) -> list[Contender]:
    # runai-model-streamer's C++ S3 client reads the AWS SDK's variables (names checked in its libstreamers3.so
    # and runai_model_streamer_s3/files.py): AWS_ENDPOINT_URL, AWS_REGION, the keys, and path-style addressing
    # via RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0. IMDS is disabled so that a credential miss fails fast.
    runai_env = (
        ("AWS_ENDPOINT_URL", server.endpoint_url),
        ("AWS_ACCESS_KEY_ID", server.key),
        ("AWS_SECRET_ACCESS_KEY", server.secret),
        ("AWS_REGION", server.region),
        ("AWS_DEFAULT_REGION", server.region),
        ("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    )
    return [
        START,
        raw("presigned"),
        *stream_st("s3", "s3fs cat_file"),
        # An s3fs-only option (the block size of s3fs's file objects, unused by stream_st) makes s3fs presign.
        Contender(
            "stream_st_s3fs_signs",
            "stream_st.load_file(s3://…) with an s3fs-only option: s3fs presigns, not botocore alone",
            "import stream_st\n"
            "sd = stream_st.load_file(URL, storage_options={**SO, 'default_block_size': 1 << 24}, direct_http=True)",
        ),
        Contender(
            "runai",
            "runai-model-streamer SafetensorsStreamer(s3://…)",
            "from runai_model_streamer import SafetensorsStreamer\nwith SafetensorsStreamer() as streamer:\n"
            "    streamer.stream_file(URL)\n    sd = dict(streamer.get_tensors())",
            env=runai_env,
        ),
        Contender(
            "boto3",
            "boto3 download_file + safetensors.torch.load_file",
            "import os, tempfile, boto3, safetensors.torch\nfrom botocore.config import Config\n"
            "c = boto3.client('s3', endpoint_url=ENDPOINT, aws_access_key_id=KEY, aws_secret_access_key=SECRET,\n"
            "    region_name=REGION, config=Config(s3={'addressing_style': 'path'}))\n"
            "with tempfile.TemporaryDirectory() as d:\n    p = os.path.join(d, 'model.safetensors')\n"
            "    c.download_file(BUCKET, OBJECT, p)\n    sd = safetensors.torch.load_file(p)",
        ),
        Contender("s3fs", "s3fs open().read() + safetensors.torch.load", FSSPEC_READ),
    ]


def gcs_contenders() -> list[Contender]:
    return [
        START,
        raw("media"),
        *stream_st("gs", "gcsfs cat_file"),
        Contender("gcsfs", "gcsfs open().read() + safetensors.torch.load", FSSPEC_READ),
    ]


def hub_contenders() -> list[Contender]:
    return [
        START,
        raw("CDN"),
        *stream_st("hf", "HfFileSystem cat_file"),
        # An option only HfFileSystem takes (its file objects' block size, unused by stream_st) makes the load
        # resolve through HfFileSystem (its import, a repo-info request), as every hf:// load did before.
        Contender(
            "stream_st_hffs_resolves",
            "stream_st.load_file(hf://…) with an HfFileSystem-only option: HfFileSystem resolves the URL",
            "import stream_st\n"
            "sd = stream_st.load_file(URL, storage_options={**SO, 'block_size': 0}, direct_http=True)",
        ),
        Contender(
            "hf_hub_download",
            "hf_hub_download (temp cache dir) + safetensors.torch.load_file",
            "import tempfile, safetensors.torch\nfrom huggingface_hub import hf_hub_download\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    p = hf_hub_download(REPO_ID, FILENAME, endpoint=ENDPOINT, cache_dir=d, token=False)\n"
            "    sd = safetensors.torch.load_file(p)",
        ),
    ]


def azure_contenders() -> list[Contender]:
    return [
        START,
        raw("SAS"),
        *stream_st("az", "adlfs cat_file per range"),
        Contender(
            "adlfs",
            "adlfs cat_file (whole blob) + safetensors.torch.load",
            "import fsspec, safetensors.torch\nfs, path = fsspec.core.url_to_fs(URL, **SO)\n"
            "sd = safetensors.torch.load(fs.cat_file(path))",
        ),
        Contender(
            "azure_blob",
            f"azure-storage-blob download_blob(max_concurrency={AZURE_CONCURRENCY}).readall() + safetensors.torch.load",
            "import safetensors.torch\nfrom azure.storage.blob import BlobServiceClient\n"
            "service = BlobServiceClient.from_connection_string(SO['connection_string'])\n"
            "blob = service.get_blob_client(CONTAINER, OBJECT)\n"
            "sd = safetensors.torch.load(blob.download_blob(max_concurrency=CONCURRENCY).readall())",
        ),
    ]


# --------------------------------------------------------------------------------------------------------
# Targets: a server started and loaded with the checkpoint, what the children are told, and who competes.


@dataclass
class Target:
    label: str
    values: dict[str, Any]  # the contenders' globals (URL, SO, RAW_URL, ...)
    contenders: list[Contender]
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every child on this server
    notes: list[str] = field(default_factory=list)


def _values(ckpt: Checkpoint, url: str, storage_options: dict[str, Any], raw_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "URL": url,
        "SO": storage_options,
        "RAW_URL": raw_url,
        "SIZE": ckpt.file_bytes,
        "LOCAL": str(ckpt.path),
        **extra,
    }


def _object(ckpt: Checkpoint) -> str:
    return f"checkpoints/{ckpt.path.name}"


@contextlib.contextmanager
def s3_target(name: str, ckpt: Checkpoint, out: Path) -> Iterator[Target]:
    if name == "s3rver":
        servers.ensure_s3rver(out)  # an npm install on first use, not part of the start-up time
    t0 = time.perf_counter()
    with servers.localstack(BUCKET) if name == "localstack" else servers.s3rver(out, BUCKET) as server:
        started_s = time.perf_counter() - t0
        key = _object(ckpt)
        t0 = time.perf_counter()
        server.make_bucket(BUCKET)
        server.upload(BUCKET, key, ckpt.path)
        upload_s = time.perf_counter() - t0
        values = _values(
            ckpt,
            f"s3://{BUCKET}/{key}",
            server.storage_options,
            server.presign(BUCKET, key),
            ENDPOINT=server.endpoint_url,
            KEY=server.key,
            SECRET=server.secret,
            REGION=server.region,
            BUCKET=BUCKET,
            OBJECT=key,
        )
        label = (
            f"LocalStack host mode at {server.endpoint_url}"
            if name == "localstack"
            else f"s3rver {servers.S3RVER_VERSION} at {server.endpoint_url}"
        )
        how = (
            "LocalStack started in {:.1f} s (install.sh + start.sh)"
            if name == "localstack"
            else "s3rver started in {:.1f} s"
        )
        notes = [how.format(started_s), f"upload (one PutObject) took {upload_s:.1f} s"]
        yield Target(label, values, s3_contenders(server), notes=notes)


@contextlib.contextmanager
def gcs_target(name: str, ckpt: Checkpoint, out: Path) -> Iterator[Target]:
    with servers.gcs() as emulator:
        blob = _object(ckpt)
        t0 = time.perf_counter()
        emulator.make_bucket(BUCKET)
        emulator.upload(BUCKET, blob, ckpt.path.read_bytes())
        upload_s = time.perf_counter() - t0
        quoted = urllib.parse.quote(blob, safe="")
        media = f"{emulator.endpoint}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media"
        yield Target(
            f"gcp-storage-emulator (in memory) at {emulator.endpoint}",
            _values(ckpt, f"gs://{BUCKET}/{blob}", emulator.storage_options, media),
            gcs_contenders(),
            # gcsfs otherwise asks a gRPC API the emulator lacks about the bucket type (see tests/gcs_server.py);
            # a user on real GCS would not pay this, so it is switched off for every GCS child alike.
            env={"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"},
            notes=[f"upload (one media upload) took {upload_s:.1f} s"],
        )


def _cdn_url(resolve_url: str) -> str:
    """Where the Hub's resolve URL redirects (a HEAD, redirect not followed)."""
    u = urllib.parse.urlsplit(resolve_url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
    try:
        conn.request("HEAD", u.path)
        r = conn.getresponse()
        r.read()
        location = r.getheader("Location")
        if r.status not in (301, 302, 303, 307, 308) or not location:
            raise RuntimeError(f"HEAD {resolve_url}: expected a redirect to the CDN, got {r.status}")
        return location
    finally:
        conn.close()


@contextlib.contextmanager
def hub_target(name: str, ckpt: Checkpoint, out: Path) -> Iterator[Target]:
    with tempfile.TemporaryDirectory(prefix="hub.", dir=out) as root, servers.hub(Path(root) / "repos") as server:
        repo, filename = "bench/llama-like", "model.safetensors"
        t0 = time.perf_counter()
        server.commit(repo, {filename: ckpt.path})
        commit_s = time.perf_counter() - t0
        values = _values(
            ckpt,
            f"hf://{repo}/{filename}",
            server.storage_options(token=False),
            _cdn_url(server.resolve_url(repo, filename)),
            REPO_ID=repo,
            FILENAME=filename,
            ENDPOINT=server.endpoint,
        )
        yield Target(
            f"Hub-compatible server at {server.endpoint}, LFS redirected to its CDN at {server.cdn_endpoint} "
            "(aiohttp, in this benchmark's process, on its own thread)",
            values,
            hub_contenders(),
            env={**server.environ(), "HF_HOME": str(Path(root) / "hf_home")},  # never the user's cache or token
            notes=[f"commit (copy + sha256) took {commit_s:.1f} s"],
        )


@contextlib.contextmanager
def azurite_target(name: str, ckpt: Checkpoint, out: Path) -> Iterator[Target]:
    import azure_server  # tests/, on the path through harness.servers

    t0 = time.perf_counter()
    with servers.azurite() as server:
        started_s = time.perf_counter() - t0
        blob = _object(ckpt)
        t0 = time.perf_counter()
        server.make_container(BUCKET)
        with ckpt.path.open("rb") as body:
            server.service().get_blob_client(BUCKET, blob).upload_blob(
                body, overwrite=True, length=ckpt.file_bytes, max_concurrency=4
            )
        upload_s = time.perf_counter() - t0
        from azure.storage.blob import generate_blob_sas

        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 24 * 3600))
        sas = generate_blob_sas(
            azure_server.ACCOUNT, BUCKET, blob, account_key=azure_server.ACCOUNT_KEY, permission="r", expiry=expiry
        )
        values = _values(
            ckpt,
            f"az://{BUCKET}/{blob}",
            server.storage_options,
            f"{server.blob_endpoint}/{BUCKET}/{blob}?{sas}",
            CONTAINER=BUCKET,
            OBJECT=blob,
            CONCURRENCY=AZURE_CONCURRENCY,
        )
        yield Target(
            f"Azurite {servers.azurite_version()} (Blob service, on disk) at {server.blob_endpoint}",
            values,
            azure_contenders(),
            notes=[
                f"Azurite started in {started_s:.1f} s",
                f"upload (Put Block + Put Block List) took {upload_s:.1f} s",
            ],
        )


TARGETS = {
    "localstack": s3_target,
    "s3rver": s3_target,
    "gcs": gcs_target,
    "hub": hub_target,
    "azurite": azurite_target,
}


# --------------------------------------------------------------------------------------------------------
# Report


def table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["contender", "median wall s", "min–max s", "GB/s", "× (start + raw)", "peak RSS MiB", "check"]
    cells = [
        [
            r["label"],
            *report.wall_cells(r),
            report.fmt(r.get("gbps")),
            report.fmt(r.get("x_floor")),
            f"{r['rss_mib']:.0f}",
            report.check_cell(r),
        ]
        if "median_s" in r
        else report.untimed_cells(r, len(header))
        for r in rows
    ]
    return report.table(header, cells, "lrrrrrl")


def _vs(rows: list[dict[str, Any]], key: str, other: str, label: str, note: str) -> list[str]:
    x, y = report.get_row(rows, key), report.get_row(rows, other)
    if not (x and y):
        return []
    a, b = x["median_s"], y["median_s"]
    return [f"- {label} = {a:.2f} / {b:.2f} = **{a / b:.2f}×** {note}"]


def ratios(name: str, rows: list[dict[str, Any]]) -> list[str]:
    start, raw_row, ours = (report.get_row(rows, k) for k in ("start", "raw", "stream_st"))
    s3 = name in ("localstack", "s3rver")
    lines = []
    for key in ("adlfs", "azure_blob"):
        other = report.get_row(rows, key)
        if ours and other:
            met = "met" if ours["median_s"] < other["median_s"] else "NOT met"
            lines += _vs(rows, "stream_st", key, f"stream_st ÷ {key}", f"(target < 1: {met})")
    if start and raw_row:
        floor = start["median_s"] + raw_row["median_s"]
        lines.append(
            f"- floor = start + raw = {start['median_s']:.2f} + {raw_row['median_s']:.2f} = {floor:.2f} s "
            f"(raw alone: {raw_row['gbps']:.2f} GB/s)"
        )
        if ours:
            x = ours["median_s"] / floor
            verdict = f" (target ≤ {TARGET_VS_FLOOR:.2f}: {'met' if x <= TARGET_VS_FLOOR else 'NOT met'})" if s3 else ""
            lines.append(f"- stream_st ÷ floor = {ours['median_s']:.2f} / {floor:.2f} = **{x:.2f}×**{verdict}")
    else:
        lines.append("- floor not computed: start or raw had no successful run")
    fs_path = report.get_row(rows, "stream_st_fsspec")
    if ours and fs_path:
        faster = "direct_http=True" if ours["median_s"] < fs_path["median_s"] else "direct_http=False"
        by = abs(ours["median_s"] - fs_path["median_s"])
        note = f"({faster} faster, by {by:.2f} s)"
        lines += _vs(rows, "stream_st", "stream_st_fsspec", "direct_http=True ÷ direct_http=False", note)
    for key, label, why in (
        ("stream_st_s3fs_signs", "botocore signs ÷ s3fs signs", "the import of s3fs and aiobotocore, mostly"),
        (
            "stream_st_hffs_resolves",
            "resolve URL alone ÷ HfFileSystem resolves",
            "HfFileSystem's import and its repo-info request",
        ),
    ):
        other = report.get_row(rows, key)
        if ours and other:
            lines += _vs(rows, "stream_st", key, label, f"({other['median_s'] - ours['median_s']:+.2f} s: {why})")
    if s3:
        runai = report.get_row(rows, "runai")
        if ours and runai:
            met = "met" if ours["median_s"] < runai["median_s"] else "NOT met"
            lines += _vs(rows, "stream_st", "runai", "stream_st ÷ runai", f"(target < 1: {met})")
        elif ours:
            lines.append("- stream_st ÷ runai: not computed (runai-model-streamer had no successful run)")
    return lines


def body(sections: list[dict[str, Any]], ckpt: Checkpoint) -> list[str]:
    parts = [
        f"Checkpoint `{ckpt.path.name}`: {ckpt.file_bytes:,} B ({ckpt.file_bytes / (1 << 30):.3f} GiB), "
        f"{len(ckpt.spans)} bf16 tensors. Every server on 127.0.0.1, one at a time. Each contender is a fresh "
        "process (wall = `time.perf_counter()` around the whole child; peak RSS from GNU `time -f %M`); order "
        "rotated each round; median of the successful runs. GB/s = file bytes ÷ median wall (start-up included, "
        "so not a transfer rate). × (start + raw) = median ÷ (start's median + raw's median). Each contender "
        "first ran once untimed, checking its tensors bit for bit against `safetensors.torch.load_file` of the "
        f"local file (raw: its bytes against the file). raw = {RAW_THREADS} threads of `http.client`, keep-alive, "
        f"{RAW_PART >> 20} MiB ranges read into one reused buffer per thread, bytes discarded, no torch import.",
        "",
    ]
    for s in sections:
        parts += [f"## {s['name']}: {s['label']}", ""]
        if s.get("error"):
            parts += [f"**Not run**: {s['error']}", ""]
            continue
        rounds_text = f"{s['repeats']} round{'s' if s['repeats'] != 1 else ''}. "
        parts += [rounds_text + " ".join(n + "." for n in s["notes"]), "", *table(s["rows"]), ""]
        parts += ratios(s["name"], s["rows"]) + [""]
        problems = report.problems(s["rows"])
        if problems:
            parts += ["Failures:", "", *problems, ""]
    return parts


def main() -> int:
    p = arguments(__doc__)
    p.add_argument(
        "--repeats-for",
        action="append",
        default=[],
        metavar="SERVER=N",
        help="rounds for one server instead of --repeats (e.g. localstack=3); may be repeated",
    )
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), help="servers to run (default all)")
    p.add_argument("--only", nargs="+", help="run only these contender keys (e.g. start raw stream_st)")
    p.add_argument(
        "--stream-st-ref",
        default="HEAD",
        help="git revision whose stream_st the children import (a git worktree checkout); 'worktree': the live tree",
    )
    args = p.parse_args()
    repeat_map = {}
    for item in args.repeats_for:
        name, _, n = item.partition("=")
        if name not in SERVERS or not n.isdigit():
            p.error(f"--repeats-for wants SERVER=N with SERVER one of {SERVERS}, got {item!r}")
        repeat_map[name] = int(n)
    out = report.out_dir(args.out)
    ckpt = ensure_checkpoint(out, args.size_gib)
    began = time.perf_counter()
    with checkout(args.stream_st_ref, out / "checkouts") as code:
        found = report.versions(
            child_env(code.root),
            code.root,
            [
                "fsspec",
                "s3fs",
                "aiobotocore",
                "boto3",
                "botocore",
                "gcsfs",
                "huggingface_hub",
                "runai-model-streamer",
                "runai-model-streamer-s3",
                "gcp-storage-emulator",
                "aiohttp",
                "adlfs",
                "azure-storage-blob",
                "azure-core",
            ],
        )
        found["stream_st code"] = code.description
        found["localstack-core"] = _localstack_version()
        found["s3rver"] = servers.S3RVER_VERSION
        found["node"] = report.tool_version("node", "--version")
        info = report.machine()
        print(f"checkpoint {ckpt.path.name}: {ckpt.file_bytes / (1 << 30):.3f} GiB; stream_st: {code.description}")
        sections: list[dict[str, Any]] = []
        for name in args.servers:
            section: dict[str, Any] = {"name": name, "label": name, "repeats": repeat_map.get(name, args.repeats)}
            sections.append(section)
            t0 = time.perf_counter()
            print(f"\n== {name} ==", flush=True)
            try:
                with TARGETS[name](name, ckpt, out) as target:
                    section["label"], section["notes"] = target.label, target.notes
                    print(f"  {target.label}; " + "; ".join(target.notes), flush=True)
                    chosen = [c for c in target.contenders if not args.only or c.key in args.only]

                    def run(c: Contender, check: bool, target: Target = target) -> Any:
                        env = child_env(code.root, {**target.env, **dict(c.env)})
                        return run_process(c.argv(target.values, check), env, code.root)

                    outcomes = rounds.compare(chosen, run, section["repeats"], tag=f"[{name}] ")
            except Exception as exc:  # a server that cannot start or take the upload: recorded, the rest go on
                section["error"] = f"{type(exc).__name__}: {exc}"
                print(f"  {name} not run: {section['error']}", flush=True)
                continue
            section["rows"] = [rounds.summary(o) for o in outcomes]
            section["runs"] = {o.contender.key: [asdict(r) for r in o.runs] for o in outcomes}
            _add_rates(section["rows"], ckpt.file_bytes)
            section["seconds"] = time.perf_counter() - t0
            print(f"\n### {name} ({section['seconds']:.0f} s)\n", *table(section["rows"]), sep="\n")
            print("\n" + "\n".join(ratios(name, section["rows"])), flush=True)
    report.finish(info)["benchmark wall time"] = f"{time.perf_counter() - began:.0f} s"
    text = report.document(
        "stream_st cloud load benchmark (S3, GCS, Hub, Azure on local servers)", body(sections, ckpt), info, found
    )
    print("\n" + text)
    data = {
        "checkpoint": {"path": str(ckpt.path), "bytes": ckpt.file_bytes, "tensors": len(ckpt.spans)},
        "machine": info,
        "versions": found,
        "args": vars(args),
        "raw_client": {"threads": RAW_THREADS, "part_bytes": RAW_PART},
        "servers": sections,
    }
    report.write(out, "cloud_results", text, data)
    return 0


def _add_rates(rows: list[dict[str, Any]], size: int) -> None:
    start, raw_row = report.get_row(rows, "start"), report.get_row(rows, "raw")
    for r in rows:
        if "median_s" in r and r["key"] != "start":
            r["gbps"] = size / r["median_s"] / 1e9
            if start and raw_row:
                r["x_floor"] = r["median_s"] / (start["median_s"] + raw_row["median_s"])


def _localstack_version() -> str:
    python = REPO / "localstack" / ".venv" / "bin" / "python"
    if not python.exists():
        return "not installed"
    code = "import importlib.metadata as m, platform as p; print(m.version('localstack-core'), p.python_version())"
    return report.tool_version(str(python), "-c", code)


if __name__ == "__main__":
    sys.exit(main())
