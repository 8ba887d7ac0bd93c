"""The MetaDrive world, rendered for real in its own venv (.venv-world): placed objects -> ground truth -> QA,
six camera views, the same scene from two processes, bags, errors."""
import numpy as np
import pytest

from owled_ros.cli import main as owled
from owled_ros.data.bags import carla_topics, image_topics, import_bag, write_drive
from owled_ros.data.calib import read_samples
from owled_ros.data.metadrive_world import Spec, lamp_pixels, render_world, sample_spec
from owled_ros.data.world import CAMERAS

RED_LIGHT = Spec(seed=11, map_seed=5, traffic_density=0.0, warmup_steps=2, light="red", light_distance=20.0,
                 pedestrians=[[10.0, 6.0, False], [40.0, -6.5, False]])
CROSSING = Spec(seed=12, map_seed=7, traffic_density=0.0, warmup_steps=2, pedestrians=[[12.0, 0.5, True]],
                vehicles=[[20.0, 0, 0.0], [-12.0, 0, 6.0]], dropout="CAM_BACK_LEFT")

CURVE = sample_spec(39)  # map 53: the ego lane curves, and its red light 27.8 m along it is not straight ahead
AGAINST_THE_SUN = sample_spec(1_000_003)  # a red light 30.8 m straight ahead, the sun behind it


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    samples = render_world(tmp_path_factory.mktemp("world") / "set", specs=[RED_LIGHT, CROSSING, CURVE, AGAINST_THE_SUN])
    return {s.id: s for s in samples}


def answers(sample):
    return {item["kind"]: item["answer"] for item in sample.qa}


def test_a_placed_red_light_is_red_in_the_qa(rendered):
    sample = rendered["metadrive-11"]
    assert sample.truth["light"] == "red" and sample.truth["light_distance"] == pytest.approx(20.0, abs=0.5)
    assert answers(sample)["lights"] == "The traffic light is red."
    assert answers(sample)["planning"] == "Stop, because the traffic light is red."


def test_the_light_of_a_curving_ego_lane_is_the_scenes_light(rendered):
    sample = rendered["metadrive-39"]
    assert (CURVE.light, CURVE.light_distance) == ("red", 27.8)
    assert sample.truth["light"] == "red" and sample.truth["light_distance"] == pytest.approx(27.8, abs=0.5)
    assert answers(sample)["planning"] == "Stop, because the traffic light is red."


def test_a_red_lamp_straight_ahead_shows_red_in_the_stored_front_view(rendered):
    # lit by the scene's sun, the face of a light straight ahead rendered black whenever the sun stood behind
    # it; stored with 4:2:0 chroma the lamp's colour halved again
    assert (AGAINST_THE_SUN.light, AGAINST_THE_SUN.light_distance) == ("red", 30.8)
    assert lamp_pixels(rendered["metadrive-1000003"].image("CAM_FRONT"), "red") >= 1
    assert lamp_pixels(rendered["metadrive-12"].image("CAM_FRONT"), "red") == 0  # no light: no red above the road


def test_a_pedestrian_at_10_m_is_counted_at_40_m_not(rendered):
    sample = rendered["metadrive-11"]
    people = sorted((a["x"], a["y"]) for a in sample.truth["agents"] if a["label"] == "pedestrian")
    assert people == [pytest.approx((10.0, 6.0), abs=0.3), pytest.approx((40.0, -6.5), abs=0.3)]  # y: left of the ego
    assert sample.truth["n_pedestrians"] == 1
    assert "1 pedestrian within 30 meters" in answers(sample)["perception"]


def test_a_crossing_pedestrian_and_a_stopped_lead_vehicle(rendered):
    sample = rendered["metadrive-12"]
    assert answers(sample)["crossing"] == "Yes, a pedestrian is crossing."
    assert answers(sample)["lead"] == "No, it is stopped."
    behind = [a for a in sample.truth["agents"] if a["label"] in ("car", "truck") and a["x"] < 0]
    assert len(behind) == 1 and behind[0]["moving"] and behind[0]["camera"] == "CAM_BACK"
    assert sample.truth["n_cars"] == 2


def test_six_real_views_and_a_dropped_one(rendered):
    full, partial = rendered["metadrive-11"].images(), rendered["metadrive-12"].images()
    assert sorted(full) == sorted(CAMERAS) and sorted(partial) == sorted(set(CAMERAS) - {"CAM_BACK_LEFT"})
    for image in full.values():
        assert image.shape == (128, 224, 3) and image.std() > 10  # sky, road, grass: not a blank frame
    top, bottom = full["CAM_FRONT"][:40].mean(axis=(0, 1)), full["CAM_FRONT"][-40:].mean(axis=(0, 1))
    assert top[2] > top[0] and abs(top - bottom).sum() > 60  # blue sky above, road below
    assert np.abs(full["CAM_FRONT"].astype(int) - full["CAM_BACK"]).mean() > 5


def test_the_same_spec_renders_the_same_scene_in_another_process(rendered, tmp_path):
    again = render_world(tmp_path / "again", specs=[RED_LIGHT])[0]
    first = rendered["metadrive-11"]
    assert again.truth == first.truth and again.qa == first.qa
    for camera in CAMERAS:  # the same pixels: held-out sets rendered in different runs are the same frame sets
        assert np.array_equal(again.image(camera), first.image(camera)), camera


def test_rendered_frame_sets_round_trip_through_a_bag(rendered, tmp_path):
    samples = [rendered["metadrive-11"], rendered["metadrive-12"]]
    bag = write_drive(tmp_path / "bag", ((i * 10**9, s.images()) for i, s in enumerate(samples)))
    assert sorted(image_topics(bag)) == sorted(carla_topics().values())
    written, bad = import_bag(bag, tmp_path / "imported")
    assert (written, bad) == (1, 0)  # the set with a lost view never completes: import keeps complete sets
    assert sorted(read_samples(tmp_path / "imported")[0].images()) == sorted(CAMERAS)


def test_world_without_its_venv_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OWLED_WORLD_PYTHON", str(tmp_path / "missing" / "python"))
    assert owled(["calib", "world", str(tmp_path / "out"), "--count", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "MetaDrive venv" in error and not (tmp_path / "out").exists()
