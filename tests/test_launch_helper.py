"""The test helper that runs launches: a hung launch is killed whole, even a worker in a session of its own."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from tests.training_helpers import run_with_stack_dump

# A launcher that starts a worker in a new session (as torch's elastic agent may) and never ends; the worker holds
# the launcher's stdout and stderr open.
HUNG_LAUNCH = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
    "print('started', flush=True); time.sleep(600)"
)


def test_a_hung_launch_is_killed_with_its_detached_workers():
    raised = []

    def run():
        with pytest.raises(subprocess.TimeoutExpired) as hang:
            run_with_stack_dump([sys.executable, "-c", HUNG_LAUNCH], timeout=3)
        raised.append(hang.value)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "communicate() still waits on a worker that outlived the kill"
    assert "started" in raised[0].stdout
