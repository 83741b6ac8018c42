"""The bundle format: building, and strict parsing of hostile tars (guideline 13)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from hearth.updates.bundle import (
    BundleLimits,
    Delivery,
    Manifest,
    ReleaseInfo,
    build_bundle,
    check_path,
    extract_bundle,
    parse_target_name,
    parse_version,
    read_manifest,
    target_name_for,
    verify_bundle,
)
from hearth.updates.errors import UpdateError, UpdateReason
from tests.updates.support import make_app, make_bundle


def _manifest(files: dict[str, bytes], **over: object) -> bytes:
    obj: dict[str, object] = {
        "format": 1, "model": "thermostat", "version": "1.0.0", "min_from_version": "0.0.0",
        "files": {p: {"sha256": hashlib.sha256(d).hexdigest(), "length": len(d)}
                  for p, d in files.items()},
    }
    obj.update(over)
    return json.dumps(obj).encode()


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def _refused(path: Path, reason: UpdateReason = UpdateReason.BAD_BUNDLE) -> UpdateError:
    with pytest.raises(UpdateError) as e:
        verify_bundle(path)
    assert e.value.reason is reason, e.value
    return e.value


def test_build_then_verify_round_trip(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "1.2.0", min_from="1.0.0", extra_bytes=1000)
    manifest = verify_bundle(bundle)
    assert (manifest.model, manifest.version, manifest.min_from_version) == (
        "thermostat", "1.2.0", "1.0.0")
    assert set(manifest.files) == {"app.py", "lib/__init__.py", "lib/control.py", "lib/data.bin"}
    _m, raw = read_manifest(bundle)
    assert Manifest.parse(raw) == manifest
    with tarfile.open(bundle) as tar:
        assert tar.getnames()[0] == "manifest.json"


def test_build_is_deterministic(tmp_path: Path) -> None:
    app = make_app(tmp_path / "app", "1.0.0")
    a = tmp_path / "a.tar"
    b = tmp_path / "b.tar"
    build_bundle(app, model="thermostat", version="1.0.0", min_from_version="0.0.0", out=a)
    build_bundle(app, model="thermostat", version="1.0.0", min_from_version="0.0.0", out=b)
    assert a.read_bytes() == b.read_bytes()


def test_build_refuses_symlinks(tmp_path: Path) -> None:
    app = make_app(tmp_path / "app", "1.0.0")
    (app / "link.py").symlink_to("/etc/passwd")
    with pytest.raises(UpdateError) as e:
        build_bundle(app, model="thermostat", version="1.0.0", min_from_version="0.0.0",
                     out=tmp_path / "x.tar")
    assert e.value.reason is UpdateReason.BAD_BUNDLE


@pytest.mark.parametrize("path", [
    "/etc/passwd", "../evil.py", "a/../../evil.py", "./a.py", "a//b.py", ".hidden",
    "a/.git/config", "", "manifest.json", "a\\b.py", "a b.py", "x" * 300,
])
def test_hostile_paths_are_refused(path: str) -> None:
    with pytest.raises(UpdateError):
        check_path(path)


def test_absolute_path_member_refused(tmp_path: Path) -> None:
    data = b"evil"
    _refused(_tar(tmp_path / "b.tar", [("manifest.json", _manifest({"/etc/x": data})),
                                       ("/etc/x", data)]))


def test_dotdot_member_refused(tmp_path: Path) -> None:
    data = b"evil"
    _refused(_tar(tmp_path / "b.tar", [("manifest.json", _manifest({"ok.py": data})),
                                       ("../ok.py", data)]))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                  tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE])
def test_non_regular_members_refused(tmp_path: Path, kind: bytes) -> None:
    info = tarfile.TarInfo("app.py")
    info.type = kind
    info.linkname = "/etc/passwd"
    _refused(_tar(tmp_path / "b.tar", [("manifest.json", _manifest({"app.py": b""})), info]))


def test_manifest_must_come_first(tmp_path: Path) -> None:
    data = b"x"
    _refused(_tar(tmp_path / "b.tar", [("app.py", data),
                                       ("manifest.json", _manifest({"app.py": data}))]))


def test_file_not_in_manifest_refused(tmp_path: Path) -> None:
    data = b"x"
    _refused(_tar(tmp_path / "b.tar", [("manifest.json", _manifest({"app.py": data})),
                                       ("app.py", data), ("extra.py", data)]))


def test_file_missing_from_bundle_refused(tmp_path: Path) -> None:
    data = b"x"
    _refused(_tar(tmp_path / "b.tar", [
        ("manifest.json", _manifest({"app.py": data, "other.py": data})), ("app.py", data)]))


def test_duplicate_member_refused(tmp_path: Path) -> None:
    data = b"x"
    _refused(_tar(tmp_path / "b.tar", [("manifest.json", _manifest({"app.py": data})),
                                       ("app.py", data), ("app.py", data)]))


def test_content_differing_from_manifest_refused(tmp_path: Path) -> None:
    _refused(_tar(tmp_path / "b.tar", [("manifest.json", _manifest({"app.py": b"good"})),
                                       ("app.py", b"evil")]), UpdateReason.HASH_MISMATCH)


def test_length_differing_from_manifest_refused(tmp_path: Path) -> None:
    _refused(_tar(tmp_path / "b.tar", [("manifest.json", _manifest({"app.py": b"good"})),
                                       ("app.py", b"longer evil")]), UpdateReason.HASH_MISMATCH)


def test_unknown_manifest_field_refused(tmp_path: Path) -> None:
    data = b"x"
    _refused(_tar(tmp_path / "b.tar", [
        ("manifest.json", _manifest({"app.py": data}, run_as="root")), ("app.py", data)]))


def test_bad_versions_refused(tmp_path: Path) -> None:
    data = b"x"
    for bad in ({"version": "1.0"}, {"version": "01.0.0"}, {"version": 1},
                {"min_from_version": "2.0.0"}):
        _refused(_tar(tmp_path / "b.tar", [
            ("manifest.json", _manifest({"app.py": data}, **bad)), ("app.py", data)]))


def test_compressed_or_garbage_refused(tmp_path: Path) -> None:
    (tmp_path / "g.tar").write_bytes(b"\x1f\x8b" + b"\0" * 2000)
    _refused(tmp_path / "g.tar")


def test_limits_are_enforced(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "1.0.0", extra_bytes=5000)
    with pytest.raises(UpdateError) as e:
        verify_bundle(bundle, limits=BundleLimits(max_files=3))
    assert e.value.reason is UpdateReason.BAD_BUNDLE
    with pytest.raises(UpdateError):
        verify_bundle(bundle, limits=BundleLimits(max_file_bytes=4000))
    big = make_bundle(tmp_path, "2.0.0", extra_bytes=60_000)
    with pytest.raises(UpdateError) as e:  # refused from its size, before parsing
        verify_bundle(big, limits=BundleLimits(max_total_bytes=100, max_manifest_bytes=1000,
                                               max_files=4))
    assert e.value.reason is UpdateReason.TOO_LARGE


def test_extract_checks_signed_manifest_hash_before_writing(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "1.0.0")
    dest = tmp_path / "out"
    with pytest.raises(UpdateError) as e:
        extract_bundle(bundle, dest, expected_manifest_sha256="0" * 64)
    assert e.value.reason is UpdateReason.HASH_MISMATCH
    assert not dest.exists() or not any(dest.iterdir())
    _m, raw = read_manifest(bundle)
    manifest, _raw = extract_bundle(bundle, dest,
                                    expected_manifest_sha256=hashlib.sha256(raw).hexdigest())
    assert (dest / "lib" / "control.py").read_text().endswith("# 1.0.0\n")
    assert oct((dest / "app.py").stat().st_mode & 0o777) == oct(0o644)
    assert manifest.version == "1.0.0"


def test_versions_and_names() -> None:
    assert parse_version("1.10.0") > parse_version("1.9.99")
    assert target_name_for("lock", "2.0.1") == "lock/lock-2.0.1.tar"
    assert parse_target_name("lock/lock-2.0.1.tar") == ("lock", "2.0.1")
    with pytest.raises(UpdateError):
        parse_target_name("lock/thermostat-2.0.1.tar")


def test_release_info_is_strict() -> None:
    good = {"model": "lock", "version": "1.0.0", "min_from_version": "0.0.0",
            "manifest_sha256": "a" * 64}
    assert ReleaseInfo.from_custom(good).model == "lock"
    bads: list[object] = [{**good, "extra": 1}, {**good, "version": "x"},
                          {**good, "manifest_sha256": 5}, None, [],
                          {k: v for k, v in good.items() if k != "model"}]
    for bad in bads:
        with pytest.raises(UpdateError) as e:
            ReleaseInfo.from_custom(bad)
        assert e.value.reason is UpdateReason.BAD_TARGET_INFO


def test_delivery_round_trip() -> None:
    d = Delivery("lock/lock-1.0.0.tar", 2, b'{"signed": {}, "signatures": []}')
    again = Delivery.parse(d.to_bytes())
    assert (again.target_name, again.root_version) == ("lock/lock-1.0.0.tar", 2)
    assert json.loads(again.targets_metadata) == json.loads(d.targets_metadata)
    for bad in (b"[]", b"{}", b"not json", d.to_bytes().replace(b'"root_version":2',
                                                                b'"root_version":true')):
        with pytest.raises(UpdateError):
            Delivery.parse(bad)
