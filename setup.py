from setuptools import find_packages, setup

setup(
    name="owled_ros",
    version="0.1.0",
    description="OWLed pruning of driving vision-language models, with ROS 2 nodes",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["owled_ros", "owled_ros.*"]),
    package_data={"owled_ros": ["data/text/*.txt", "data/text/*.md", "data/demo_world/*/*.*", "data/demo_world/*/frames/*.jpg",
                               "model/*.safetensors"]},
    install_requires=[
        "torch==2.13.0",
        "transformers==5.23.0",
        "gguf==0.19.0",
        "accelerate==1.15.0",
        "peft==0.21.2",
        "safetensors==0.8.0",
        "numpy==2.4.6",
        "opencv-python-headless==5.0.0.93",
        "rosbags==0.11.9",
        "rosbags-image==0.10.4",
        "boto3==1.44.5",
        "pycocoevalcap==1.2",
        "nltk==3.10.4",
        "tqdm==4.70.1",
        "matplotlib==3.11.2",
        "psutil==7.2.2",
        "PyYAML==6.0.3",
    ],
    entry_points={
        "console_scripts": [
            "owled = owled_ros.cli:main",
            "owled-drive-node = owled_ros.nodes.drive_node:main",
            "owled-recorder-node = owled_ros.nodes.recorder_node:main",
        ],
    },
)
