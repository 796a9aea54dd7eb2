"""Worker CPU set-up: AMX permission is asked for without ever raising; torch threads are set explicitly."""

import os
import platform

import torch

from cloud.backbone.cpu import prepare_compute_process, request_amx_permission


def test_amx_request_never_raises_and_threads_are_set():
    granted = request_amx_permission()
    assert isinstance(granted, bool)
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        assert granted is False
    before = torch.get_num_threads()
    try:
        setup = prepare_compute_process(1)
        assert setup["amx_permission"] == granted and setup["torch_threads"] == 1 and torch.get_num_threads() == 1
        assert setup["nice"] == os.getpriority(os.PRIO_PROCESS, 0)
        assert prepare_compute_process(0)["torch_threads"] == 1  # 0 leaves the count alone
    finally:
        torch.set_num_threads(before)
