"""Whole-process cloud load benchmark: stream_st against the usual S3 / GCS / Hub loaders on local servers.

    .venv/bin/python benchmarks/cloud.py [--size-gib 1.0] [--repeats 5] [--out benchmarks/out]
        [--servers localstack s3rver gcs hub azurite] [--repeats-for localstack=3] [--only stream_st raw ...]

One invocation, servers one after another (only one runs at a time), all on 127.0.0.1:

* ``localstack``: S3 on LocalStack host mode (tests/s3_server.py ``S3Server``);
* ``s3rver``: S3 on npm ``s3rver@3.7.1``, installed with npm into OUT/s3rver (git-ignored) if missing;
* ``gcs``: gcp-storage-emulator (tests/gcs_server.py ``GcsEmulator``, in memory);
* ``hub``: the Hub-compatible server of tests/hub_server.py, LFS files redirected to its "CDN" server;
* ``azurite``: Azure Blob Storage on Azurite (tests/azure_server.py ``Azurite``, plain http, account key in a
  connection string: stream_st signs a SAS with it; adlfs and azure-storage-blob sign SharedKey requests).

For each server it uploads the Llama-like bf16 checkpoint of benchmarks/checkpoint.py (the same cached
file run.py uses), runs every contender once untimed (checking the tensors bit for bit against
``safetensors.torch.load_file`` of the local file; the raw client compares its bytes with the file), then
REPEATS rounds with every contender once per round as a fresh process, the order rotated each round.
Per run: wall time around the whole child (``time.perf_counter`` around fork…exit) and the child's peak
RSS (GNU ``time -f %M``, as run.py). Writes OUT/cloud_results.md and OUT/cloud_results.json.

Targets: on S3, stream_st within 1.10× of (Python+torch start + a raw ranged-GET client)
on the same server, and faster than runai-model-streamer in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # sibling modules, whatever the cwd
sys.path.insert(1, str(REPO / "tests"))  # the real-server helpers the tests use

import report  # noqa: E402
from checkpoint import ensure_checkpoint, read_header  # noqa: E402
from contenders import VERIFY  # noqa: E402
from process import GNU_TIME, Run, run_process, timing  # noqa: E402
from report import fmt, get_row  # noqa: E402

TARGET_VS_FLOOR = 1.10  # the project's S3 target: stream_st ≤ 1.10 × (start + raw ranged client)
S3RVER_VERSION = "3.7.1"
S3RVER_KEY = "S3RVER"
BUCKET = "stream-st-bench"
RAW_THREADS = 8
RAW_PART = 16 << 20
SERVERS = ("localstack", "s3rver", "gcs", "hub", "azurite")
AZURE_CONTAINER = "stream-st-bench"
AZURE_CONCURRENCY = 8  # azure-storage-blob download_blob(max_concurrency=...), as the issue asks

# --------------------------------------------------------------------------------------------------------
# What each child process runs. argv of every child: SPEC_JSON LOCAL_PATH. Python contenders leave the
# state dict in ``sd``; the timed run appends only ``print(len(sd))``, the untimed check run appends
# contenders.VERIFY (bit-exact against safetensors.torch.load_file of the local file).

PREAMBLE = """import sys, json
SPEC = json.loads(sys.argv[1]); LOCAL = sys.argv[2]
URL = SPEC["url"]; SO = SPEC.get("storage_options")
"""

# The ceiling: 8 threads of stdlib http.client, keep-alive, 16 MiB ranges read into one reused buffer per
# thread, bytes discarded; no torch import. With a third argument it compares each range with the file.
RAW = r"""import sys, json, threading, http.client, urllib.parse
SPEC = json.loads(sys.argv[1]); LOCAL = sys.argv[2]; CHECK = len(sys.argv) > 3
URL, SIZE, PART, THREADS = SPEC["raw_url"], SPEC["size"], SPEC["raw_part"], SPEC["raw_threads"]
u = urllib.parse.urlsplit(URL)
target = u.path + ("?" + u.query if u.query else "")
parts = iter([(s, min(s + PART, SIZE)) for s in range(0, SIZE, PART)])
lock = threading.Lock()
done, errors = [0] * THREADS, []
def worker(i):
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
        buf = memoryview(bytearray(PART))
        local = open(LOCAL, "rb") if CHECK else None
        while True:
            with lock:
                p = next(parts, None)
            if p is None:
                break
            s, e = p
            conn.request("GET", target, headers={"Range": f"bytes={s}-{e - 1}"})
            r = conn.getresponse()
            if r.status != 206:
                raise RuntimeError(f"HTTP {r.status} for bytes={s}-{e - 1}: {r.read(300)!r}")
            n, want = 0, e - s
            while n < want:
                k = r.readinto(buf[n:want])
                if not k:
                    raise RuntimeError(f"short read at {s + n} (wanted {want} from {s})")
                n += k
            if r.read(1):
                raise RuntimeError(f"more than {want} bytes for bytes={s}-{e - 1}")
            if local is not None:
                local.seek(s)
                if local.read(want) != buf[:want]:
                    raise RuntimeError(f"bytes {s}-{e - 1} differ from the file")
            done[i] += n
        conn.close()
    except BaseException as exc:
        errors.append(exc)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
for t in threads: t.start()
for t in threads: t.join()
if errors:
    raise errors[0]
assert sum(done) == SIZE, (sum(done), SIZE)
print(f"verified {sum(done)} bytes" if CHECK else sum(done))
"""

LOADS: dict[str, str] = {
    "start": "import torch, safetensors\nsd = {}",
    "stream_st": "import stream_st\nsd = stream_st.load_file(URL, storage_options=SO, direct_http=True)",
    "stream_st_fsspec": "import stream_st\nsd = stream_st.load_file(URL, storage_options=SO, direct_http=False)",
    # An s3fs-only option (the block size of s3fs's file objects, unused by stream_st) makes s3fs presign.
    "stream_st_s3fs_signs": (
        "import stream_st\n"
        "sd = stream_st.load_file(URL, storage_options={**SO, 'default_block_size': 1 << 24}, direct_http=True)"
    ),
    # An option only HfFileSystem takes (its file objects' block size, unused by stream_st) makes the load
    # resolve through HfFileSystem (its import, a repo-info request), as every hf:// load did before.
    "stream_st_hffs_resolves": (
        "import stream_st\nsd = stream_st.load_file(URL, storage_options={**SO, 'block_size': 0}, direct_http=True)"
    ),
    "runai": (
        "from runai_model_streamer import SafetensorsStreamer\n"
        "with SafetensorsStreamer() as streamer:\n"
        "    streamer.stream_file(URL)\n"
        "    sd = dict(streamer.get_tensors())"
    ),
    "boto3": (
        "import os, tempfile, boto3, safetensors.torch\n"
        "from botocore.config import Config\n"
        "c = boto3.client('s3', endpoint_url=SPEC['endpoint'], aws_access_key_id=SPEC['key'],\n"
        "    aws_secret_access_key=SPEC['secret'], region_name=SPEC['region'],\n"
        "    config=Config(s3={'addressing_style': 'path'}))\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    p = os.path.join(d, 'model.safetensors')\n"
        "    c.download_file(SPEC['bucket'], SPEC['object'], p)\n"
        "    sd = safetensors.torch.load_file(p)"
    ),
    "fsspec_read": (  # s3fs / gcsfs, whichever the URL's scheme picks
        "import fsspec, safetensors.torch\n"
        "with fsspec.open(URL, 'rb', **SO) as f:\n"
        "    data = f.read()\n"
        "sd = safetensors.torch.load(data)"
    ),
    "adlfs": (  # adlfs's cat_file of the whole blob, the bytes loaded by safetensors
        "import fsspec, safetensors.torch\n"
        "fs, path = fsspec.core.url_to_fs(URL, **SO)\n"
        "sd = safetensors.torch.load(fs.cat_file(path))"
    ),
    "azure_blob": (  # azure-storage-blob's parallel download into memory, then safetensors
        "import safetensors.torch\n"
        "from azure.storage.blob import BlobServiceClient\n"
        "service = BlobServiceClient.from_connection_string(SO['connection_string'])\n"
        "blob = service.get_blob_client(SPEC['container'], SPEC['object'])\n"
        "sd = safetensors.torch.load(blob.download_blob(max_concurrency=SPEC['concurrency']).readall())"
    ),
    "hf_hub_download": (
        "import tempfile, safetensors.torch\n"
        "from huggingface_hub import hf_hub_download\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    p = hf_hub_download(SPEC['repo_id'], SPEC['filename'], endpoint=SPEC['endpoint'], cache_dir=d,\n"
        "                        token=False)\n"
        "    sd = safetensors.torch.load_file(p)"
    ),
}


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    load: str | None  # None: the raw client
    verifiable: bool = True
    env: tuple[tuple[str, str], ...] = ()  # extra environment of this contender only

    def argv(self, spec: dict[str, Any], local: Path, verify: bool = False) -> list[str]:
        spec_json = json.dumps(spec)
        if self.load is None:
            return [sys.executable, "-c", RAW, spec_json, str(local), *(["check"] if verify else [])]
        tail = VERIFY if verify and self.verifiable else "print(len(sd))"
        return [sys.executable, "-c", PREAMBLE + self.load + "\n" + tail, spec_json, str(local)]


def s3_contenders(endpoint: str, key: str, secret: str, region: str) -> list[Contender]:
    # runai-model-streamer's C++ S3 client reads the AWS SDK's variables (names checked in its libstreamers3.so
    # and runai_model_streamer_s3/files.py): AWS_ENDPOINT_URL, AWS_REGION, the keys, and path-style addressing
    # via RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING=0. IMDS is disabled so a credential miss fails fast.
    runai_env = (
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_REGION", region),
        ("AWS_DEFAULT_REGION", region),
        ("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    )
    return [
        Contender("start", "python -c 'import torch, safetensors' (start-up only)", LOADS["start"], verifiable=False),
        Contender("raw", f"raw ranged GETs: {RAW_THREADS} threads, http.client, 16 MiB, presigned URL", None),
        Contender("stream_st", "stream_st.load_file(s3://…, direct_http=True)", LOADS["stream_st"]),
        Contender(
            "stream_st_fsspec",
            "stream_st.load_file(s3://…, direct_http=False) (s3fs cat_file)",
            LOADS["stream_st_fsspec"],
        ),
        Contender(
            "stream_st_s3fs_signs",
            "stream_st.load_file(s3://…) with an s3fs-only option: s3fs presigns, not botocore alone",
            LOADS["stream_st_s3fs_signs"],
        ),
        Contender("runai", "runai-model-streamer SafetensorsStreamer(s3://…)", LOADS["runai"], env=runai_env),
        Contender("boto3", "boto3 download_file + safetensors.torch.load_file", LOADS["boto3"]),
        Contender("s3fs", "s3fs open().read() + safetensors.torch.load", LOADS["fsspec_read"]),
    ]


def gcs_contenders() -> list[Contender]:
    return [
        Contender("start", "python -c 'import torch, safetensors' (start-up only)", LOADS["start"], verifiable=False),
        Contender("raw", f"raw ranged GETs: {RAW_THREADS} threads, http.client, 16 MiB, media URL", None),
        Contender("stream_st", "stream_st.load_file(gs://…, direct_http=True)", LOADS["stream_st"]),
        Contender(
            "stream_st_fsspec",
            "stream_st.load_file(gs://…, direct_http=False) (gcsfs cat_file)",
            LOADS["stream_st_fsspec"],
        ),
        Contender("gcsfs", "gcsfs open().read() + safetensors.torch.load", LOADS["fsspec_read"]),
    ]


def hub_contenders() -> list[Contender]:
    return [
        Contender("start", "python -c 'import torch, safetensors' (start-up only)", LOADS["start"], verifiable=False),
        Contender("raw", f"raw ranged GETs: {RAW_THREADS} threads, http.client, 16 MiB, CDN URL", None),
        Contender("stream_st", "stream_st.load_file(hf://…, direct_http=True)", LOADS["stream_st"]),
        Contender(
            "stream_st_fsspec",
            "stream_st.load_file(hf://…, direct_http=False) (HfFileSystem cat_file)",
            LOADS["stream_st_fsspec"],
        ),
        Contender(
            "stream_st_hffs_resolves",
            "stream_st.load_file(hf://…) with an HfFileSystem-only option: HfFileSystem resolves the URL",
            LOADS["stream_st_hffs_resolves"],
        ),
        Contender(
            "hf_hub_download",
            "hf_hub_download (temp cache dir) + safetensors.torch.load_file",
            LOADS["hf_hub_download"],
        ),
    ]


def azure_contenders() -> list[Contender]:
    return [
        Contender("start", "python -c 'import torch, safetensors' (start-up only)", LOADS["start"], verifiable=False),
        Contender("raw", f"raw ranged GETs: {RAW_THREADS} threads, http.client, 16 MiB, SAS URL", None),
        Contender("stream_st", "stream_st.load_file(az://…, direct_http=True)", LOADS["stream_st"]),
        Contender(
            "stream_st_fsspec",
            "stream_st.load_file(az://…, direct_http=False) (adlfs cat_file per range)",
            LOADS["stream_st_fsspec"],
        ),
        Contender("adlfs", "adlfs cat_file (whole blob) + safetensors.torch.load", LOADS["adlfs"]),
        Contender(
            "azure_blob",
            f"azure-storage-blob download_blob(max_concurrency={AZURE_CONCURRENCY}).readall() + safetensors.torch.load",
            LOADS["azure_blob"],
        ),
    ]


# --------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Result:
    contender: Contender
    check: str = ""
    check_ok: bool = True
    check_wall_s: float | None = None
    runs: list[Run] = field(default_factory=list)


@dataclass
class Target:
    """One server with the checkpoint uploaded: what the children are told, and who competes."""

    name: str
    label: str
    spec: dict[str, Any]
    contenders: list[Contender]
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every child on this server
    notes: list[str] = field(default_factory=list)


# Where the children import stream_st from, and run: a frozen snapshot (see snapshot_stream_st), so edits
# made to the working tree while the benchmark runs cannot change the code measured halfway through.
CODE_ROOT = REPO


def snapshot_stream_st(ref: str, out: Path) -> tuple[Path, str]:
    """A read-only copy of ``stream_st/`` at git ``ref`` under OUT/stream_st-snapshots (or the live tree)."""
    if ref == "worktree":
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "stream_st"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return REPO, f"live working tree at {head}" + (" with uncommitted changes in stream_st/" if dirty else "")
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = out / "stream_st-snapshots" / sha[:12]
    if not (dest / "stream_st" / "__init__.py").exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha, "stream_st"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    subject = subprocess.run(
        ["git", "log", "-1", "--format=%s", sha], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return dest, f"{sha} (git archive of {ref}: {subject[:80]})"


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """stream_st importable from CODE_ROOT, its defaults, loopback only, no stray cloud configuration."""
    drop = ("AWS_", "STREAM_ST_", "HF_", "HUGGING_FACE_", "GOOGLE_", "GCSFS_", "RUNAI_", "AZURE_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith(drop) and k != "STORAGE_EMULATOR_HOST"
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_once(argv: list[str], env: dict[str, str]) -> Run:
    """One fresh process, measured as run.py measures. cwd: ``python -c`` puts it first on sys.path, so
    stream_st comes from CODE_ROOT."""
    return run_process(argv, env, CODE_ROOT)


def contender_env(target: Target, c: Contender) -> dict[str, str]:
    return child_env({**target.env, **dict(c.env)})


def check(result: Result, target: Target, local: Path) -> None:
    """The untimed run: verifies the result; also warms caches (and the server) before timing."""
    c = result.contender
    run = run_once(c.argv(target.spec, local, verify=True), contender_env(target, c))
    result.check_wall_s = run.wall_s
    if not run.ok:
        result.check_ok = False
        result.check = f"FAILED (exit {run.rc}): {run.output}"
    elif c.verifiable:
        last = run.output.splitlines()[-1] if run.output else ""
        result.check_ok = last.startswith("verified")
        result.check = last if result.check_ok else f"FAILED (no 'verified' line): {run.output}"
    else:
        result.check = "not checked (no tensors)"
    print(
        f"  [{target.name}] check {c.key:17s} {'ok ' if result.check_ok else 'ERR'} {run.wall_s:6.2f}s  "
        f"{result.check.splitlines()[0][:110] if result.check else ''}",
        flush=True,
    )


def measure(results: list[Result], target: Target, local: Path, repeats: int) -> None:
    # A contender whose check failed is not timed: its failure is recorded once, with the reason.
    timed = [r for r in results if r.check_ok]
    for r in range(repeats):
        k = r % len(timed) if timed else 0
        for result in timed[k:] + timed[:k]:  # rotate who goes first
            c = result.contender
            run = run_once(c.argv(target.spec, local), contender_env(target, c))
            result.runs.append(run)
            note = "" if run.ok else f"  FAILED exit {run.rc}: {run.output.splitlines()[-1] if run.output else ''}"
            print(
                f"  [{target.name}] round {r + 1}/{repeats} {c.key:17s} {run.wall_s:6.2f}s  "
                f"{run.rss_mib:7.0f} MiB{note}",
                flush=True,
            )


# --------------------------------------------------------------------------------------------------------
# Servers: each a context manager that starts the server, uploads the checkpoint and yields a Target.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _object_key(local: Path) -> str:
    return f"checkpoints/{local.name}"


def _s3_target(name: str, label: str, server: Any, local: Path, size: int) -> Target:
    key = _object_key(local)
    t0 = time.perf_counter()
    server.make_bucket(BUCKET)
    server.upload(BUCKET, key, local)
    upload_s = time.perf_counter() - t0
    spec = {
        "url": f"s3://{BUCKET}/{key}",
        "storage_options": server.storage_options,
        "raw_url": server.presign(BUCKET, key),
        "size": size,
        "raw_part": RAW_PART,
        "raw_threads": RAW_THREADS,
        "endpoint": server.endpoint_url,
        "key": server.key,
        "secret": server.secret,
        "region": server.region,
        "bucket": BUCKET,
        "object": key,
    }
    return Target(
        name,
        label,
        spec,
        s3_contenders(server.endpoint_url, server.key, server.secret, server.region),
        notes=[f"upload (one PutObject) took {upload_s:.1f} s"],
    )


@contextlib.contextmanager
def localstack(local: Path, size: int, out: Path) -> Iterator[Target]:
    import s3_server

    os.environ.pop(s3_server.ENDPOINT_ENV, None)  # always our own LocalStack, never an external endpoint
    ok, why = s3_server.localstack_available()
    if not ok:
        raise RuntimeError(f"LocalStack not available: {why}")
    server = s3_server.S3Server(bucket_prefix=BUCKET)
    server.key = server.secret = "test"
    server.token = None
    server.region = "us-east-1"
    server.addressing_style = "path"
    t0 = time.perf_counter()
    server.start()
    try:
        target = _s3_target("localstack", f"LocalStack host mode at {server.endpoint_url}", server, local, size)
        target.notes.insert(0, f"LocalStack started in {time.perf_counter() - t0:.1f} s (install.sh + start.sh)")
        yield target
    finally:
        server.stop()


def ensure_s3rver(out: Path) -> str:
    """The s3rver script, installed with npm into OUT/s3rver (git-ignored) on first use."""
    prefix = out / "s3rver"
    exe = prefix / "node_modules" / ".bin" / "s3rver"
    if exe.exists():
        return str(exe)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (apt-get install nodejs npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), f"s3rver@{S3RVER_VERSION}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or not exe.exists():
        raise RuntimeError(f"npm install s3rver@{S3RVER_VERSION} failed ({done.returncode}): {done.stderr[-2000:]}")
    return str(exe)


def _s3rver_class() -> type:
    from s3_server import S3Server

    class S3rver(S3Server):  # type: ignore[misc]
        """s3rver as an S3Server: same client helpers (storage_options, upload, presign), own life cycle."""

        def __init__(self, exe: str, data_dir: Path) -> None:
            super().__init__(bucket_prefix=BUCKET)
            self.exe, self.data_dir = exe, data_dir
            self.key = self.secret = S3RVER_KEY
            self.token = None
            self.region = "us-east-1"
            self.addressing_style = "path"
            self.process: subprocess.Popen[bytes] | None = None
            self.log_path = data_dir.parent / "s3rver.log"

        def start(self) -> S3rver:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            port = _free_port()
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [self.exe, "-d", str(self.data_dir), "-a", "127.0.0.1", "-p", str(port), "--silent",
                     "--allow-mismatched-signatures", "--no-vhost-buckets"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"s3rver exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}"
                    )
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"s3rver did not listen on {endpoint} within 30 s") from None
                    time.sleep(0.1)
            self.endpoint_url = endpoint
            return self

        def stop(self) -> None:
            process, self.process = self.process, None
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)  # its own session: only what we started
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
            self._client = None

    return S3rver


@contextlib.contextmanager
def s3rver(local: Path, size: int, out: Path) -> Iterator[Target]:
    exe = ensure_s3rver(out)
    data_root = Path(tempfile.mkdtemp(prefix="s3rver.", dir=out))
    server = _s3rver_class()(exe, data_root / "data")
    t0 = time.perf_counter()
    server.start()
    try:
        target = _s3_target("s3rver", f"s3rver {S3RVER_VERSION} at {server.endpoint_url}", server, local, size)
        target.notes.insert(0, f"s3rver started in {time.perf_counter() - t0:.1f} s")
        yield target
    finally:
        server.stop()
        shutil.rmtree(data_root, ignore_errors=True)


@contextlib.contextmanager
def gcs(local: Path, size: int, out: Path) -> Iterator[Target]:
    from gcs_server import ENDPOINT_ENV, GcsEmulator, find_emulator

    os.environ.pop(ENDPOINT_ENV, None)
    if find_emulator() is None:
        raise RuntimeError("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    emulator = GcsEmulator()
    emulator.start()
    try:
        name = _object_key(local)
        t0 = time.perf_counter()
        emulator.make_bucket(BUCKET)
        data = local.read_bytes()
        emulator.upload(BUCKET, name, data)
        del data
        upload_s = time.perf_counter() - t0
        quoted = urllib.parse.quote(name, safe="")
        spec = {
            "url": f"gs://{BUCKET}/{name}",
            "storage_options": emulator.storage_options,
            "raw_url": f"{emulator.endpoint}/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media",
            "size": size,
            "raw_part": RAW_PART,
            "raw_threads": RAW_THREADS,
        }
        # gcsfs otherwise asks a gRPC API the emulator lacks about the bucket type (see gcs_server.py); a user
        # on real GCS would not pay this, so it is switched off for every GCS child alike.
        env = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        yield Target(
            "gcs",
            f"gcp-storage-emulator (in memory) at {emulator.endpoint}",
            spec,
            gcs_contenders(),
            env=env,
            notes=[f"upload (one media upload) took {upload_s:.1f} s"],
        )
    finally:
        emulator.stop()


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
def hub(local: Path, size: int, out: Path) -> Iterator[Target]:
    from hub_server import HubServer

    root = Path(tempfile.mkdtemp(prefix="hub.", dir=out))
    server = HubServer(root / "repos", redirect="lfs")
    try:
        t0 = time.perf_counter()
        repo, filename = "bench/llama-like", "model.safetensors"
        server.commit(repo, {filename: local})
        commit_s = time.perf_counter() - t0
        spec = {
            "url": f"hf://{repo}/{filename}",
            "storage_options": server.storage_options(token=False),
            "raw_url": _cdn_url(server.resolve_url(repo, filename)),
            "size": size,
            "raw_part": RAW_PART,
            "raw_threads": RAW_THREADS,
            "repo_id": repo,
            "filename": filename,
            "endpoint": server.endpoint,
        }
        env = {**server.environ(), "HF_HOME": str(root / "hf_home")}  # never the user's cache or token
        yield Target(
            "hub",
            f"Hub-compatible server at {server.endpoint}, LFS redirected to its CDN at {server.cdn_endpoint} "
            "(aiohttp, in this benchmark's process, on its own thread)",
            spec,
            hub_contenders(),
            env=env,
            notes=[f"commit (copy + sha256) took {commit_s:.1f} s"],
        )
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def azurite(local: Path, size: int, out: Path) -> Iterator[Target]:
    import azure_server

    server = azure_server.Azurite()
    t0 = time.perf_counter()
    server.start()
    try:
        started_s = time.perf_counter() - t0
        blob = _object_key(local)
        t0 = time.perf_counter()
        server.make_container(AZURE_CONTAINER)
        client = server.service().get_blob_client(AZURE_CONTAINER, blob)
        with local.open("rb") as body:
            client.upload_blob(body, overwrite=True, length=size, max_concurrency=4)
        upload_s = time.perf_counter() - t0
        from azure.storage.blob import generate_blob_sas

        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 24 * 3600))
        sas = generate_blob_sas(
            azure_server.ACCOUNT,
            AZURE_CONTAINER,
            blob,
            account_key=azure_server.ACCOUNT_KEY,
            permission="r",
            expiry=expiry,
        )
        spec = {
            "url": f"az://{AZURE_CONTAINER}/{blob}",
            "storage_options": server.storage_options,
            "raw_url": f"{server.blob_endpoint}/{AZURE_CONTAINER}/{blob}?{sas}",
            "size": size,
            "raw_part": RAW_PART,
            "raw_threads": RAW_THREADS,
            "container": AZURE_CONTAINER,
            "object": blob,
            "concurrency": AZURE_CONCURRENCY,
        }
        yield Target(
            "azurite",
            f"Azurite {_azurite_version()} (Blob service, on disk) at {server.blob_endpoint}",
            spec,
            azure_contenders(),
            notes=[
                f"Azurite started in {started_s:.1f} s",
                f"upload (Put Block + Put Block List) took {upload_s:.1f} s",
            ],
        )
    finally:
        server.stop()


def _azurite_version() -> str:
    package = REPO / "azurite" / "node_modules" / "azurite" / "package.json"
    return str(json.loads(package.read_text()).get("version")) if package.exists() else "?"


SERVER_FACTORIES = {"localstack": localstack, "s3rver": s3rver, "gcs": gcs, "hub": hub, "azurite": azurite}


# --------------------------------------------------------------------------------------------------------
# Summary and report


def summarize(results: list[Result], size: int) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        c = result.contender
        ok = [r for r in result.runs if r.ok]
        row: dict[str, Any] = {
            "key": c.key,
            "label": c.label,
            "runs": len(result.runs),
            "ok_runs": len(ok),
            "check": result.check,
            "check_ok": result.check_ok,
            "check_wall_s": result.check_wall_s,
            "failures": [r.output for r in result.runs if not r.ok],
            "walls_all": [r.wall_s for r in result.runs],
            "rcs": [r.rc for r in result.runs],
        }
        if ok:
            row.update(timing(ok))
            if c.key != "start":
                row["gbps"] = size / row["median_s"] / 1e9
        rows.append(row)
    start, raw = get_row(rows, "start"), get_row(rows, "raw")
    if start and raw:
        floor = start["median_s"] + raw["median_s"]
        for row in rows:
            if "median_s" in row and row["key"] not in ("start",):
                row["x_floor"] = row["median_s"] / floor
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| contender | median wall s | min–max s | GB/s | × (start + raw) | peak RSS MiB | check |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        check = ("ok" if r["check"].startswith("verified") else "—") if r["check_ok"] else "**FAILED**"
        if "median_s" not in r:
            why = "not timed: check failed" if not r["check_ok"] else f"FAILED ({r['runs']} of {r['runs']} runs)"
            out.append(f"| {r['label']} | **{why}** | | | | | {check} |")
            continue
        failed = f" ({r['runs'] - r['ok_runs']} runs failed)" if r["ok_runs"] < r["runs"] else ""
        out.append(
            f"| {r['label']} | {r['median_s']:.2f}{failed} | {r['min_s']:.2f}–{r['max_s']:.2f} "
            f"| {fmt(r.get('gbps'))} | {fmt(r.get('x_floor'))} | {r['rss_mib']:.0f} | {check} |"
        )
    return "\n".join(out)


def ratios(name: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    start, raw = get_row(rows, "start"), get_row(rows, "raw")
    ours, fs_path, runai = get_row(rows, "stream_st"), get_row(rows, "stream_st_fsspec"), get_row(rows, "runai")
    s3 = name in ("localstack", "s3rver")
    for key in ("adlfs", "azure_blob"):
        other = get_row(rows, key)
        if ours and other:
            ratio = ours["median_s"] / other["median_s"]
            lines.append(
                f"- stream_st ÷ {key} = {ours['median_s']:.2f} / {other['median_s']:.2f} = **{ratio:.2f}×** "
                f"(target < 1: {'met' if ratio < 1 else 'NOT met'})"
            )
    if start and raw:
        floor = start["median_s"] + raw["median_s"]
        lines.append(
            f"- floor = start + raw = {start['median_s']:.2f} + {raw['median_s']:.2f} = {floor:.2f} s "
            f"(raw alone: {raw['gbps']:.2f} GB/s)"
        )
        if ours:
            ratio = ours["median_s"] / floor
            verdict = (
                f" (target ≤ {TARGET_VS_FLOOR:.2f}: {'met' if ratio <= TARGET_VS_FLOOR else 'NOT met'})" if s3 else ""
            )
            lines.append(f"- stream_st ÷ floor = {ours['median_s']:.2f} / {floor:.2f} = **{ratio:.2f}×**{verdict}")
    else:
        lines.append("- floor not computed: start or raw had no successful run")
    if ours and fs_path:
        ratio = ours["median_s"] / fs_path["median_s"]
        faster = "direct_http=True" if ratio < 1 else "direct_http=False"
        lines.append(
            f"- direct_http=True ÷ direct_http=False = {ours['median_s']:.2f} / {fs_path['median_s']:.2f} = "
            f"**{ratio:.2f}×** ({faster} faster, by {abs(ours['median_s'] - fs_path['median_s']):.2f} s)"
        )
    s3fs_signs = get_row(rows, "stream_st_s3fs_signs")
    if ours and s3fs_signs:
        lines.append(
            f"- botocore signs ÷ s3fs signs = {ours['median_s']:.2f} / {s3fs_signs['median_s']:.2f} = "
            f"**{ours['median_s'] / s3fs_signs['median_s']:.2f}×** "
            f"({s3fs_signs['median_s'] - ours['median_s']:+.2f} s: the import of s3fs and aiobotocore, mostly)"
        )
    hffs = get_row(rows, "stream_st_hffs_resolves")
    if ours and hffs:
        lines.append(
            f"- resolve URL alone ÷ HfFileSystem resolves = {ours['median_s']:.2f} / {hffs['median_s']:.2f} = "
            f"**{ours['median_s'] / hffs['median_s']:.2f}×** "
            f"({hffs['median_s'] - ours['median_s']:+.2f} s: HfFileSystem's import and its repo-info request)"
        )
    if s3:
        if ours and runai:
            ratio = ours["median_s"] / runai["median_s"]
            lines.append(
                f"- stream_st ÷ runai = {ours['median_s']:.2f} / {runai['median_s']:.2f} = **{ratio:.2f}×** "
                f"(target < 1: {'met' if ratio < 1 else 'NOT met'})"
            )
        elif ours:
            lines.append("- stream_st ÷ runai: not computed (runai-model-streamer had no successful run)")
    return lines


def markdown(
    sections: list[dict[str, Any]],
    header: Any,
    local: Path,
    machine: dict[str, str],
    versions: dict[str, Any],
    args: Any,
) -> str:
    parts = [
        "# stream_st cloud load benchmark (S3, GCS, Hub, Azure on local servers)",
        "",
        f"Checkpoint `{local.name}`: {header.file_bytes:,} B ({header.file_bytes / (1 << 30):.3f} GiB), "
        f"{len(header.spans)} bf16 tensors. Every server on 127.0.0.1, one at a time. Each contender is a fresh "
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
        parts += [
            f"{s['repeats']} round{'s' if s['repeats'] != 1 else ''}. " + " ".join(n + "." for n in s["notes"]),
            "",
            table(s["rows"]),
            "",
        ]
        parts += ratios(s["name"], s["rows"]) + [""]
        problems = _problems(s["rows"])
        if problems:
            parts += ["Failures:", "", *problems, ""]
    parts += ["## Machine and versions", ""]
    parts += [f"- {k}: {v}" for k, v in machine.items()]
    parts += [f"- {k}: {v}" for k, v in versions.items()]
    command = f".venv/bin/python benchmarks/cloud.py --size-gib {args.size_gib} --repeats {args.repeats}"
    if args.repeats_for:
        command += "".join(f" --repeats-for {x}" for x in args.repeats_for)
    if args.servers != list(SERVERS):
        command += " --servers " + " ".join(args.servers)
    if args.only:
        command += " --only " + " ".join(args.only)
    if args.stream_st_ref != "HEAD":
        command += f" --stream-st-ref {args.stream_st_ref}"
    parts += ["", f"Command: `{command}`", ""]
    return "\n".join(parts)


def _problems(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if not r["check_ok"]:
            lines.append(f"- {r['key']}: check run failed (so it was not timed):\n\n```\n{r['check']}\n```")
        for failure in r["failures"][:1]:
            lines.append(
                f"- {r['key']}: {len(r['failures'])} of {r['runs']} timed runs failed; first:\n\n```\n{failure}\n```"
            )
    return lines


def probe(env: dict[str, str], out: Path) -> dict[str, Any]:
    code = r"""
import json, importlib.metadata as md, platform
out = {"python": platform.python_version()}
for dist in ("torch", "safetensors", "fsspec", "s3fs", "aiobotocore", "boto3", "botocore", "gcsfs",
             "huggingface_hub", "runai-model-streamer", "runai-model-streamer-s3", "gcp-storage-emulator", "aiohttp",
             "adlfs", "azure-storage-blob", "azure-core"):
    try: out[dist] = md.version(dist)
    except Exception as e: out[dist] = f"missing ({e})"
try:
    import stream_st
    from stream_st.config import Config
    out["stream_st"] = getattr(stream_st, "__version__", "?") + " imported from " + stream_st.__file__
    cfg = Config()
    out["stream_st config"] = {"part_size": cfg.part_size, "max_concurrency": cfg.max_concurrency,
                               "direct_http": cfg.direct_http}
except Exception as e:
    out["stream_st"] = f"import failed: {e!r}"
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=CODE_ROOT, capture_output=True, text=True)
    versions: dict[str, Any] = json.loads(done.stdout) if done.returncode == 0 else {"probe": done.stderr}
    ls_python = REPO / "localstack" / ".venv" / "bin" / "python"
    if ls_python.exists():
        done = subprocess.run(
            [str(ls_python), "-c", "import importlib.metadata as m, platform; "
             "print(m.version('localstack-core'), 'on Python', platform.python_version())"],
            capture_output=True, text=True,
        )  # fmt: skip
        versions["localstack-core"] = (done.stdout or done.stderr).strip()
    package = out / "s3rver" / "node_modules" / "s3rver" / "package.json"
    if package.exists():
        versions["s3rver"] = json.loads(package.read_text()).get("version")
    node = shutil.which("node")
    if node:
        versions["node"] = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    return versions


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size to generate (default 1.0)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per server; the median is reported")
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
        help="git commit whose stream_st/ the children import (a snapshot, default HEAD); 'worktree': the live tree",
    )
    p.add_argument("--out", type=Path, default=HERE / "out", help="output and cache folder (default benchmarks/out)")
    args = p.parse_args()
    args.repeat_map = {}
    for item in args.repeats_for:
        name, _, n = item.partition("=")
        if name not in SERVERS or not n.isdigit():
            p.error(f"--repeats-for wants SERVER=N with SERVER one of {SERVERS}, got {item!r}")
        args.repeat_map[name] = int(n)
    return args


def main() -> int:
    args = parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    global CODE_ROOT
    CODE_ROOT, code_note = snapshot_stream_st(args.stream_st_ref, out)
    local = ensure_checkpoint(out, args.size_gib)
    header = read_header(local)
    size = header.file_bytes
    versions = probe(child_env({}), out)
    versions["stream_st code"] = code_note
    machine = report.machine_info()
    machine["peak RSS from"] = "GNU time %M of each child" if GNU_TIME else "wait4 ru_maxrss (upper bound)"
    print(
        f"checkpoint {local.name}: {size / (1 << 30):.3f} GiB, {len(header.spans)} tensors, "
        f"header {header.header_bytes} B",
        flush=True,
    )
    print("versions:", json.dumps(versions), flush=True)

    began = time.perf_counter()
    sections: list[dict[str, Any]] = []
    for name in args.servers:
        repeats = args.repeat_map.get(name, args.repeats)
        section: dict[str, Any] = {"name": name, "label": name, "repeats": repeats}
        sections.append(section)
        t0 = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        try:
            with SERVER_FACTORIES[name](local, size, out) as target:
                section["label"], section["notes"] = target.label, target.notes
                print(f"  {target.label}; " + "; ".join(target.notes), flush=True)
                chosen = [c for c in target.contenders if not args.only or c.key in args.only]
                results = [Result(c) for c in chosen]
                for result in results:
                    check(result, target, local)
                measure(results, target, local, repeats)
        except Exception as exc:  # a server that cannot start or take the upload: recorded, the rest go on
            section["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  {name} not run: {section['error']}", flush=True)
            continue
        section["rows"] = summarize(results, size)
        section["seconds"] = time.perf_counter() - t0
        print(f"\n### {name} ({section['seconds']:.0f} s)\n\n" + table(section["rows"]), flush=True)
        print("\n" + "\n".join(ratios(name, section["rows"])), flush=True)
    machine["load average after"] = report.loadavg()
    machine["benchmark wall time"] = f"{time.perf_counter() - began:.0f} s"

    text = markdown(sections, header, local, machine, versions, args)
    print("\n" + text)
    (out / "cloud_results.md").write_text(text)
    raw = {
        "checkpoint": {"path": str(local), "bytes": size, "tensors": len(header.spans)},
        "machine": machine,
        "versions": versions,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "raw_client": {"threads": RAW_THREADS, "part_bytes": RAW_PART},
        "servers": sections,
    }
    (out / "cloud_results.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"wrote {out / 'cloud_results.md'}, {out / 'cloud_results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
