"""The local stack: real SeaweedFS + MLflow processes, started and stopped by pid file."""

import os

import pytest

from pydantic import SecretStr

from contracts.process_identity import pid_alive
from ops import stack, supervisor
from contracts.settings import get_settings
from ops.stack import free_s3_port
from ops.supervisor import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_up_is_idempotent_and_reuses_healthy_services(local_stack):
    before = {name: supervisor.read_pid(local_stack, name) for name in stack.SERVICES}
    assert all(before.values())
    stack.up(local_stack)
    after = {name: supervisor.read_pid(local_stack, name) for name in stack.SERVICES}
    assert after == before
    rows = {r.name: r for r in stack.status(local_stack)}
    assert rows["s3"].healthy and rows["mlflow"].healthy


def test_s3_accepts_only_the_configured_identity(local_stack, s3):
    from botocore.exceptions import ClientError

    from pipeline.storage import s3_client

    s3.put_object(Bucket=local_stack.s3_bucket, Key="probe/ok.txt", Body=b"ok")
    wrong = s3_client(local_stack.model_copy(update={"aws_secret_access_key": SecretStr("not-the-secret")}))
    with pytest.raises(ClientError) as info:
        wrong.get_object(Bucket=local_stack.s3_bucket, Key="probe/ok.txt")
    assert info.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")


def test_identities_file_is_private(local_stack):
    config = supervisor.stack_dir(local_stack) / "run" / "s3-identities.json"
    assert oct(config.stat().st_mode & 0o777) == "0o600"


def test_down_stops_exactly_what_it_started(tmp_path, stack_env):
    settings = get_settings(
        hemaflow_home=tmp_path / "home",
        s3_endpoint_url=f"http://127.0.0.1:{free_s3_port()}",
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
    )
    stack.up(settings)
    pids = [supervisor.read_pid(settings, n) for n in stack.SERVICES]
    assert all(pids)
    stopped = stack.down(settings)
    assert sorted(stopped) == sorted(stack.SERVICES)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not list((supervisor.stack_dir(settings) / "run").glob("*.pid"))
    assert stack.down(settings) == []


def test_up_restarts_s3_when_its_identities_change(tmp_path, stack_env):
    """SeaweedFS reads its identities at start only: a new serving secret (e.g. `make secrets` on an
    install from before serving had one) restarts it, and only the new secret is accepted."""
    import secrets

    from serving.s3 import S3Error, S3Lite

    settings = get_settings(hemaflow_home=tmp_path / "home", s3_endpoint_url=f"http://127.0.0.1:{free_s3_port()}",
                            mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")
    rotated = settings.model_copy(update={"serving_s3_secret_access_key": SecretStr(secrets.token_urlsafe(32))})
    try:
        stack.up(settings)
        before = {n: supervisor.read_pid(settings, n) for n in stack.SERVICES}
        assert S3Lite(settings).list_objects_v2(Bucket=settings.s3_bucket, Prefix="results/")["Contents"] == []
        stack.up(rotated)
        after = {n: supervisor.read_pid(settings, n) for n in stack.SERVICES}
        assert after["s3"] != before["s3"] and after["mlflow"] == before["mlflow"]
        assert S3Lite(rotated).list_objects_v2(Bucket=settings.s3_bucket, Prefix="results/")["Contents"] == []
        with pytest.raises(S3Error):
            S3Lite(settings).list_objects_v2(Bucket=settings.s3_bucket, Prefix="results/")
    finally:
        stack.down(settings)


def test_stale_pid_file_is_not_trusted(tmp_path):
    settings = get_settings(hemaflow_home=tmp_path)
    run = supervisor.stack_dir(settings) / "run"
    run.mkdir(parents=True)
    # pid 1 exists but is not the process we started: its kernel start time differs.
    (run / "s3.pid").write_text('{"pid": 1, "start_time": 123456789, "cmd": ["weed"]}')
    assert supervisor.read_pid(settings, "s3") is None
    assert stack.down(settings) == []


def test_a_process_that_renames_itself_is_still_found_and_stopped(tmp_path):
    """Airflow's components rewrite their command line; the pid file must still identify them."""
    import sys
    import time

    settings = get_settings(hemaflow_home=tmp_path)
    code = "import setproctitle, time; setproctitle.setproctitle('renamed-by-itself'); time.sleep(60)"
    pid = supervisor.start_process(settings, "renamer", [sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while b"renamed-by-itself" not in open(f"/proc/{pid}/cmdline", "rb").read():
        assert time.monotonic() < deadline, "the child never renamed itself"
        time.sleep(0.05)
    assert supervisor.read_pid(settings, "renamer") == pid
    assert stack.down(settings) == ["renamer"]
    assert not pid_alive(pid)


def test_pid_files_without_start_time_fall_back_to_the_command_line(tmp_path):
    import json
    import sys

    settings = get_settings(hemaflow_home=tmp_path)
    pid = supervisor.start_process(settings, "old", [sys.executable, "-c", "import time; time.sleep(60)"])
    pid_file = supervisor.stack_dir(settings) / "run" / "old.pid"
    pid_file.write_text(json.dumps({"pid": pid, "marker": "-c import time; time.sleep(60)"}))
    assert supervisor.read_pid(settings, "old") == pid
    pid_file.write_text(json.dumps({"pid": pid, "marker": "something else entirely"}))
    assert supervisor.read_pid(settings, "old") is None
    pid_file.write_text(json.dumps({"pid": pid, "marker": "-c import time; time.sleep(60)"}))
    assert stack.down(settings) == ["old"]
