"""Unpacked uploads: listed with their size and the runs trained on them; deleted only when no queued or running
run reads them."""
from __future__ import annotations

import pytest

from core import paths
from core.errors import UserError
from core.image_zip import unpack_image_zip
from core.run_store import RunStore
from core.uploads import UploadInUse, delete_uploaded, uploaded_sets
from tests.data_fixtures import make_imagefolder, zip_folder


def _unpack(tmp_path, name, sizes=None):
    folder = make_imagefolder(tmp_path / f"src-{name}", sizes=sizes)
    return unpack_image_zip(zip_folder(folder, tmp_path / f"{name}.zip"), f"{name}.zip")


def _run(store, name, root, state):
    store.create_run(name, {"name": name, "stages": [{"dataset": "imagefolder", "root": str(root)}]}, state=state)


def test_unpacked_uploads_are_listed_with_their_runs_and_kept_while_a_run_reads_them(tmp_path):
    pets = _unpack(tmp_path, "pets")
    birds = _unpack(tmp_path, "birds", {"owl": 3, "emu": 2})
    (paths.uploads_dir() / "by-hand").mkdir()  # not unpacked by ResLens: never listed, never deleted from here
    store = RunStore()
    _run(store, "on-pets", pets.folder, "running")
    _run(store, "earlier", pets.folder, "finished")
    _run(store, "elsewhere", tmp_path / "src-pets", "finished")
    listed = {s.target.name: s for s in uploaded_sets(store)}
    assert set(listed) == {"pets", "birds"}
    assert (listed["pets"].images, listed["birds"].images) == (pets.images, 5)
    assert listed["pets"].bytes == sum(p.stat().st_size for p in pets.target.rglob("*") if p.is_file())
    assert set(listed["pets"].runs) == {"on-pets", "earlier"} and listed["pets"].active == ("on-pets",)
    assert listed["birds"].runs == ()
    with pytest.raises(UploadInUse, match="pets is being read by run on-pets"):
        delete_uploaded(listed["pets"], store)
    assert pets.folder.is_dir()
    store.set_state("on-pets", "finished")
    delete_uploaded(listed["pets"], store)
    assert not pets.target.exists() and birds.target.is_dir()
    delete_uploaded(listed["pets"], store)  # gone already (another tab deleted it): nothing to do
    assert [s.target.name for s in uploaded_sets(store)] == ["birds"]
    (birds.target / ".reslens-upload.json").unlink()
    with pytest.raises(UserError, match="is not an unpacked upload"):
        delete_uploaded(listed["birds"], store)
    assert birds.folder.is_dir()
