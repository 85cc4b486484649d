"""s3:// caches against a real S3-compatible server (moto) on 127.0.0.1, started by the test."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="s3:// needs s3fs (pip install 'ddk-cache[s3]')")
moto_server = pytest.importorskip("moto.server", reason="the S3 test server needs moto[server]")

from click.testing import CliRunner  # noqa: E402

from ddk_cache.capture.build import build  # noqa: E402
from ddk_cache.cli.main import main  # noqa: E402
from ddk_cache.store.cache import SPLITS, Cache  # noqa: E402

from .helpers import partial_cache, small_config  # noqa: E402

pytestmark = pytest.mark.slow  # every write is an HTTP request to the local server


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    mp = pytest.MonkeyPatch()
    # Credentials and endpoint from the usual environment, as a user would set them.
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint}.items():
        mp.setenv(key, value)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="caches")
    yield endpoint
    mp.undo()
    server.stop()


def test_build_inspect_verify_on_s3(s3_endpoint, teacher_dir, corpus_dir, built_cache):
    url = "s3://caches/runs/c.zarr"
    result = build(small_config(teacher_dir, corpus_dir, url), progress=False)
    assert result.meta.state == "complete"
    remote, local = Cache(url), Cache(str(built_cache))
    for d in local.domains:
        for s in SPLITS:
            a, b = remote.read(d, s, 0, remote.num_sequences(d, s)), local.read(d, s, 0, local.num_sequences(d, s))
            np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    assert remote.meta.teacher_ppl == local.meta.teacher_ppl

    runner = CliRunner()
    inspect = runner.invoke(main, ["inspect", url])
    assert inspect.exit_code == 0 and "state: complete" in inspect.output
    verify = runner.invoke(main, ["verify", url, "--quiet"])
    assert verify.exit_code == 0, verify.output
    again = build(small_config(teacher_dir, corpus_dir, url), progress=False)
    assert again.already_complete


def test_a_missing_s3_object_is_named_not_read_as_zeros(s3_endpoint, teacher_dir, corpus_dir, built_cache):
    import boto3

    from ddk_cache.errors import StoreError

    url = "s3://caches/damaged/c.zarr"
    build(small_config(teacher_dir, corpus_dir, url), progress=False)
    boto3.client("s3", endpoint_url=s3_endpoint).delete_object(Bucket="caches", Key="damaged/c.zarr/beta/train/tokens/c/0/0")
    cache = Cache(url)
    with pytest.raises(StoreError, match=r"beta/train/tokens/c/0/0 is missing: the cache is damaged; run `ddk-cache verify`"):
        cache.read("beta", "train", 0, 2)
    verify = CliRunner().invoke(main, ["verify", url, "--quiet"])
    assert verify.exit_code == 1 and "beta/train" in verify.output


def test_s3_resume_after_crash(s3_endpoint, teacher_dir, corpus_dir, built_cache):
    url = "s3://caches/resume/c.zarr"
    partial_cache(teacher_dir, corpus_dir, url, shards=3)
    result = build(small_config(teacher_dir, corpus_dir, url), progress=False)
    assert result.meta.state == "complete" and result.shards_written < len(Cache(url).shards())
    assert Cache(url).meta.teacher_ppl == Cache(str(built_cache)).meta.teacher_ppl


def test_foreign_s3_prefix_is_refused(s3_endpoint, teacher_dir, corpus_dir):
    import s3fs

    s3fs.S3FileSystem().pipe("caches/other/readme.txt", b"not a cache")
    from ddk_cache.errors import StoreError

    with pytest.raises(StoreError, match="holds something that is not a ddk-cache store"):
        build(small_config(teacher_dir, corpus_dir, "s3://caches/other"), progress=False)
