"""Issue 6, jobs and the run store: concurrent writers, full disks, killed trainers."""
import subprocess
import sys
import textwrap

from core.run_store import RunStore

ROWS_PER_WRITER = 150

WRITER = textwrap.dedent(
    """
    import sys
    from core.run_store import RunStore
    store = RunStore()
    run, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        store.log_steps(run, 0, 0, [{"step": i, "train_loss": 1.0, "lr": 0.1}])
        if i % 10 == 0:
            store.heartbeat(run, step=i)
    """
)


def test_two_writers_and_a_reader_lose_nothing(tmp_path):
    store = RunStore()
    for run in ("w1", "w2"):
        store.create_run(run, {}, state="running")
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, run, str(ROWS_PER_WRITER)], stderr=subprocess.PIPE, text=True)
        for run in ("w1", "w2")
    ]
    reads = 0
    while any(w.poll() is None for w in writers):
        for run in store.list_runs():
            store.metrics(run["name"], "step")
        reads += 1
    errors = [w.stderr.read() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert not any("locked" in e for e in errors)
    assert reads > 0
    for run in ("w1", "w2"):
        assert [m["step"] for m in store.metrics(run, "step")] == list(range(ROWS_PER_WRITER))
