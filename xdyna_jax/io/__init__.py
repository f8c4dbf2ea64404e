"""Reading and writing media: images and videos (`video.py`), driving pose and face inputs (`driving.py`)."""
