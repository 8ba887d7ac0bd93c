"""OWLed: outlier-weighted layerwise pruning of driving vision-language models, with ROS 2 nodes."""
from pkgutil import extend_path

# rosidl generates owled_ros.msg / owled_ros.srv into the install prefix. colcon merges them with
# this package; with the editable pip setup they sit in another directory on sys.path.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
