"""A small synthetic OpenS2V dataset, built once per session and copied for tests that break it."""
import shutil

import pytest

from data.synthetic import make_demo_dataset


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("opens2v") / "demo", clips=6, parts=2, seed=0)


@pytest.fixture
def demo_copy(demo_data, tmp_path):
    """A private copy (same layout) that a test may damage."""
    root = tmp_path / "demo"
    shutil.copytree(demo_data.root, root)
    rebase = lambda paths: [root / p.relative_to(demo_data.root) for p in paths]  # noqa: E731
    return type(demo_data)(**{**demo_data.__dict__, "root": root, "json_paths": rebase(demo_data.json_paths),
                              "video_base_paths": rebase(demo_data.video_base_paths),
                              "background_base_paths": rebase(demo_data.background_base_paths),
                              "cluster_path": root / demo_data.cluster_path.relative_to(demo_data.root),
                              "cross_frames_base_path": root / demo_data.cross_frames_base_path.relative_to(demo_data.root)})
