"""The test-support hub server (kxl_testing.hub_server) answers huggingface_hub's own client code
as the hub does: downloads, listings, ranged reads, errors, gating, faults and the request log."""
from __future__ import annotations

import hashlib
import os

import pytest

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

BLOB = bytes(range(256)) * 40 + b"tail"  # 10244 bytes, LFS by its name (*.bin)
TEXT = b'{"threshold": 0.5}\n'  # a regular git file


@pytest.fixture
def repo(hub_server):
    hub_server.add_file("owner/data", "sub/blob.bin", BLOB, repo_type="dataset")
    hub_server.add_file("owner/data", "meta.json", TEXT, repo_type="dataset")
    hub_server.add_file("owner/model", "weights.safetensors", BLOB[:1000])
    return hub_server


def test_download_lfs_and_git_files_with_the_hubs_headers(repo, tmp_path):
    path = hf_hub_download("owner/data", "sub/blob.bin", repo_type="dataset", cache_dir=tmp_path / "c")
    assert open(path, "rb").read() == BLOB
    text = hf_hub_download("owner/data", "meta.json", repo_type="dataset", cache_dir=tmp_path / "c")
    assert open(text, "rb").read() == TEXT
    # the cache names blobs by the etag huggingface_hub read: sha256 for LFS, git sha1 otherwise
    assert os.path.basename(os.path.realpath(path)) == hashlib.sha256(BLOB).hexdigest()
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(TEXT) + TEXT).hexdigest()
    assert os.path.basename(os.path.realpath(text)) == git_sha1
    meta = hf.get_hf_file_metadata(hf.hf_hub_url("owner/data", "sub/blob.bin", repo_type="dataset"))
    assert meta.size == len(BLOB) and meta.etag == hashlib.sha256(BLOB).hexdigest()
    assert meta.location.startswith(repo.url + "/cdn-lfs/")  # the LFS redirect, as on the hub
    assert meta.commit_hash == HfApi().dataset_info("owner/data").sha
    # a model repo has no URL prefix
    weights = hf_hub_download("owner/model", "weights.safetensors", cache_dir=tmp_path / "c")
    assert open(weights, "rb").read() == BLOB[:1000]


def test_listing_info_and_snapshot(repo, tmp_path):
    api = HfApi()
    info = api.dataset_info("owner/data", files_metadata=True)
    assert sorted(s.rfilename for s in info.siblings) == ["meta.json", "sub/blob.bin"]
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["sub/blob.bin"].sha256 == hashlib.sha256(BLOB).hexdigest() and lfs["meta.json"] is None
    tree = {e.path: e for e in api.list_repo_tree("owner/data", repo_type="dataset", recursive=True)}
    assert set(tree) == {"meta.json", "sub", "sub/blob.bin"}
    assert tree["sub/blob.bin"].size == len(BLOB) and tree["sub/blob.bin"].lfs.size == len(BLOB)
    top = [e.path for e in api.list_repo_tree("owner/data", repo_type="dataset")]
    assert top == ["meta.json", "sub"]
    found = api.get_paths_info("owner/data", ["sub/blob.bin", "missing.txt", "sub"], repo_type="dataset")
    assert [e.path for e in found] == ["sub/blob.bin", "sub"]
    folder = snapshot_download("owner/data", repo_type="dataset", cache_dir=tmp_path / "c")
    assert open(os.path.join(folder, "sub", "blob.bin"), "rb").read() == BLOB
    assert os.path.basename(folder) == info.sha


def test_tree_pages_through_link_headers(hub_server):
    hub_server.page_size = 3
    for i in range(8):
        hub_server.add_file("owner/many", f"f{i}.txt", b"x" * i, repo_type="dataset")
    listed = [e.path for e in HfApi().list_repo_tree("owner/many", repo_type="dataset")]
    assert listed == [f"f{i}.txt" for i in range(8)]
    assert len(hub_server.requests(method="GET")) == 3  # 3 + 3 + 2


def test_ranged_reads_through_hffilesystem_and_the_log(repo):
    fs = HfFileSystem()
    with fs.open("datasets/owner/data/sub/blob.bin", "rb", cache_type="none") as handle:
        handle.seek(5000)
        assert handle.read(100) == BLOB[5000:5100]
    served = [r for r in repo.requests(file="sub/blob.bin") if r.status == 206]
    assert [(r.range, r.body_bytes) for r in served] == [("bytes=5000-5099", 100)]
    assert repo.bytes_served(file="sub/blob.bin") == 100


@pytest.mark.parametrize("header, first, last", [
    ("bytes=0-9", 0, 9), ("bytes=10240-", 10240, 10243), ("bytes=-4", 10240, 10243),
    ("bytes=10000-99999", 10000, 10243),
])
def test_range_forms(repo, header, first, last):
    import requests

    url = hf.hf_hub_url("owner/data", "sub/blob.bin", repo_type="dataset")
    response = requests.get(url, headers={"Range": header})
    assert response.status_code == 206 and response.content == BLOB[first:last + 1]
    assert response.headers["Content-Range"] == f"bytes {first}-{last}/{len(BLOB)}"


def test_unsatisfiable_range(repo):
    import requests

    url = hf.hf_hub_url("owner/data", "sub/blob.bin", repo_type="dataset")
    assert requests.get(url, headers={"Range": f"bytes={len(BLOB)}-"}).status_code == 416


def test_errors_map_to_huggingface_hub_exceptions(repo, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("owner/none", "a.bin", cache_dir=tmp_path / "c")
    with pytest.raises(RevisionNotFoundError):
        HfApi().dataset_info("owner/data", revision="v9")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("owner/data", "nope.bin", repo_type="dataset", cache_dir=tmp_path / "c")


def test_gated_repo(repo, tmp_path):
    token = repo.gate("owner/data", repo_type="dataset", token="hf_secret")
    assert HfApi().dataset_info("owner/data").gated == "manual"  # info stays public
    with pytest.raises(GatedRepoError) as error:
        hf_hub_download("owner/data", "sub/blob.bin", repo_type="dataset", cache_dir=tmp_path / "c")
    assert error.value.response.status_code == 401 and "restricted" in str(error.value)
    with pytest.raises(GatedRepoError) as error:
        hf_hub_download("owner/data", "sub/blob.bin", repo_type="dataset", cache_dir=tmp_path / "c",
                        token="hf_wrong")
    assert error.value.response.status_code == 403
    path = hf_hub_download("owner/data", "sub/blob.bin", repo_type="dataset", cache_dir=tmp_path / "c",
                           token=token)
    assert open(path, "rb").read() == BLOB


def test_status_faults_then_ok(repo, tmp_path):
    import requests

    url = hf.hf_hub_url("owner/data", "sub/blob.bin", repo_type="dataset")
    repo.fault("status", file="sub/*.bin", status=503, times=2)
    assert [requests.get(url).status_code for _ in range(3)] == [503, 503, 200]
    repo.fault("status", target="api", repo="owner/data", status=429)
    with pytest.raises(HfHubHTTPError):
        HfApi().dataset_info("owner/data")
    assert HfApi().dataset_info("owner/data").id == "owner/data"


def test_cut_and_corrupt_bodies(repo):
    import requests

    url = hf.hf_hub_url("owner/data", "sub/blob.bin", repo_type="dataset")
    repo.fault("cut", file="sub/blob.bin", after_bytes=4000)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url).content
    assert repo.requests(file="sub/blob.bin", method="GET")[-1].body_bytes == 4000
    repo.fault("corrupt", file="sub/blob.bin", at=7)
    body = requests.get(url).content
    assert len(body) == len(BLOB) and body != BLOB
    assert [i for i in range(len(BLOB)) if body[i] != BLOB[i]] == [7]
    assert requests.get(url).content == BLOB


def test_stall_holds_until_released(repo):
    import threading

    import requests

    url = hf.hf_hub_url("owner/data", "sub/blob.bin", repo_type="dataset")
    repo.fault("stall", file="sub/blob.bin", after_bytes=1000)
    outcome = []

    def fetch():
        try:
            outcome.append(len(requests.get(url).content))
        except requests.exceptions.RequestException as error:
            outcome.append(type(error).__name__)

    worker = threading.Thread(target=fetch)
    worker.start()
    assert repo.stalled.wait(30)
    assert not outcome  # still held
    repo.release_stalls()
    worker.join(30)
    assert outcome == ["ChunkedEncodingError"]
