"""package.xml is valid for catkin_pkg and declares every dependency the code imports."""
import ast
import sys
from pathlib import Path

from catkin_pkg.package import parse_package

ROOT = Path(__file__).parents[1]

# import name -> rosdep key in package.xml
ROSDEP_KEYS = {
    "rclpy": "rclpy", "std_msgs": "std_msgs", "sensor_msgs": "sensor_msgs", "builtin_interfaces": "builtin_interfaces",
    "diagnostic_msgs": "diagnostic_msgs", "launch": "launch", "launch_ros": "launch_ros",
    "numpy": "python3-numpy", "cv2": "python3-opencv", "yaml": "python3-yaml", "torch": "python3-torch",
    "transformers": "python3-transformers", "safetensors": "python3-safetensors", "tqdm": "python3-tqdm",
    "matplotlib": "python3-matplotlib", "psutil": "python3-psutil", "rosbags": "python3-rosbags-pip",
    "boto3": "python3-boto3", "botocore": "python3-boto3", "pycocoevalcap": "python3-pycocoevalcap-pip",
    "nltk": "python3-nltk", "scipy": "python3-scipy", "PIL": "python3-pil", "ament_index_python": "ament_index_python",
    "deep_sort_realtime": "python3-deep-sort-realtime-pip", "peft": "python3-peft-pip", "accelerate": "python3-accelerate-pip",
    "openvino": "python3-openvino-pip", "nncf": "python3-nncf-pip", "geometry_msgs": "geometry_msgs",
    "rosgraph_msgs": "rosgraph_msgs", "visualization_msgs": "visualization_msgs",
}


def imported_top_modules(paths):
    modules = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"owled_ros", "__future__"}


def test_package_xml_parses_with_a_valid_maintainer():
    package = parse_package(str(ROOT / "package.xml"))
    package.validate()
    assert package.name == "owled_ros"
    assert all("@" in m.email for m in package.maintainers)
    assert package.get_build_type() == "ament_cmake"


def test_every_imported_dependency_is_a_run_dependency():
    package = parse_package(str(ROOT / "package.xml"))
    run_deps = {d.name for d in package.exec_depends + package.build_export_depends + package.build_depends}
    # data/metadrive_world.py runs in its own venv (.venv-world), not in the ROS package's runtime
    code = [p for p in (ROOT / "owled_ros").rglob("*.py") if p.name != "metadrive_world.py"] + list((ROOT / "launch").glob("*.py"))
    imported = imported_top_modules(code)
    unknown = imported - set(ROSDEP_KEYS)
    assert not unknown, f"imports without a known rosdep key: {sorted(unknown)}"
    missing = {ROSDEP_KEYS[m] for m in imported} - run_deps
    assert not missing, f"package.xml lacks run dependencies: {sorted(missing)}"
    assert "rclpy" in imported and "torch" in imported


def declared_parameters(module, scope=None):
    """{name: default} of every declare_parameter call in a node module (or in one function of it), defaults
    evaluated in the module's namespace."""
    tree = ast.parse(Path(module.__file__).read_text())
    if scope:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == scope)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "declare_parameter"]
    value = lambda node: eval(compile(ast.Expression(node), module.__file__, "eval"), vars(module))  # noqa: S307
    return {value(call.args[0]): value(call.args[1]) for call in calls}


def test_the_config_files_mirror_every_declared_parameter_and_its_default():
    import yaml

    from owled_ros.nodes import drive_node, recorder_node

    cameras = declared_parameters(drive_node, "declare_camera_parameters")
    for node, config, declared in (("owled_drive", "drive.yaml", declared_parameters(drive_node)),
                                   ("owled_recorder", "recorder.yaml", declared_parameters(recorder_node) | cameras)):
        mirrored = yaml.safe_load((ROOT / "config" / config).read_text())[f"/**/{node}"]["ros__parameters"]
        assert mirrored == declared, config
