"""torch before 2.13 (2.11 on the H200 the GPU suite ran on) returns DCP's save metadata without the
files its writer recorded; the commit then reads them back from the `.metadata` DCP wrote. Without
this, every save failed there with "'NoneType' object has no attribute 'values'"."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hyrun.runtime.checkpoint.commit import _written_names
from hyrun.runtime.checkpoint.storage import LocalDirectoryStorage

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def test_the_files_of_a_save_are_read_back_when_the_returned_metadata_lacks_them(tmp_path):
    storage = LocalDirectoryStorage(tmp_path)
    storage.prepare(7)
    returned = dcp.save({"w": torch.ones(3), "b": torch.zeros(2)}, storage_writer=storage.dcp_writer(7), no_dist=True)
    on_disk = {path.name for path in storage.staging_path(7).iterdir()}
    assert _written_names(returned, storage, 7) == on_disk  # torch 2.13: from what save returned
    assert _written_names(SimpleNamespace(storage_data=None), storage, 7) == on_disk  # torch 2.11: read back
