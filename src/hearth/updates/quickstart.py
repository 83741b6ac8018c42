"""One call that gives a fresh service an update repository with a factory image per model.

``hearth demo``, the end-to-end tests and a first evaluation need units that boot signed
software, which needs offline root keys, a repository and a published release before the
first unit is minted. :func:`bootstrap` does those steps, each only if it has not been
done yet (idempotent):

1. offline root keys in ``keys_dir`` (2 of 3; a directory *outside* the service data, as
   :func:`hearth.updates.keys.init_root` requires of a real deployment);
2. the repository in ``DATA/updates`` with its online keys in ``DATA/update-keys``;
3. version ``1.0.0`` of each model's reference app (:mod:`hearth.updates.reference`),
   published: this is the factory image :func:`hearth.factory.mint` installs into slot A.

A production maker runs the same steps by hand (``hearth release root init``, ``hearth
release init``, ``hearth release publish``), with the root keys on removable media.

Example::

    repo = bootstrap(data_dir, keys_dir)
    mint(pki, model="thermostat", count=5, out=out, updates=repo)
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

from hearth.errors import ConfigError
from hearth.protocol import MODELS
from hearth.updates.bundle import target_name_for
from hearth.updates.keys import ROOT_KEYS_FILE, OfflineRootKeys, init_root
from hearth.updates.reference import build_reference_bundle
from hearth.updates.repository import Repository

__all__ = ["FACTORY_VERSION", "bootstrap", "open_repository", "repository_paths"]

FACTORY_VERSION = "1.0.0"


def repository_paths(data_dir: Path) -> tuple[Path, Path]:
    """``(repository, online keys)`` directories inside the service's data directory."""
    return data_dir / "updates", data_dir / "update-keys"


def open_repository(data_dir: Path) -> Repository:
    """The service's repository (raises ``not_provisioned`` when it was never created)."""
    path, keys = repository_paths(data_dir)
    repo = Repository(path, online_keys_dir=keys)
    repo.root_version()  # raises UpdateError(not_provisioned) if absent
    return repo


def bootstrap(
    data_dir: Path,
    keys_dir: Path,
    *,
    models: Iterable[str] = tuple(MODELS),
    version: str = FACTORY_VERSION,
) -> Repository:
    """Create (or reuse) the root keys, the repository and the reference releases."""
    data_dir = data_dir.absolute()
    keys_dir = keys_dir.absolute()
    if keys_dir == data_dir or keys_dir.is_relative_to(data_dir):
        raise ConfigError("the offline root keys must live outside the service's data")
    if (keys_dir / ROOT_KEYS_FILE).exists():
        root = OfflineRootKeys.load(keys_dir)
    else:
        root = init_root(keys_dir, threshold=2, count=3)
    path, online = repository_paths(data_dir)
    if (path / "metadata" / "1.root.json").exists():
        repo = Repository(path, online_keys_dir=online)
    else:
        repo = Repository.create(path, online_keys_dir=online, root_keys=root)
    published = {r.target_name for r in repo.releases()}
    with tempfile.TemporaryDirectory(prefix="hearth-bootstrap-") as tmp:
        for model in models:
            if target_name_for(model, version) in published:
                continue
            bundle = Path(tmp) / f"{model}-{version}.tar"
            build_reference_bundle(model, version, out=bundle)
            repo.publish(bundle, model=model, version=version, min_from_version="0.0.0")
    return repo
