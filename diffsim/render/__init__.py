"""Headless rendering of any diffsim scene: rgb_array frames drawn by Warp kernels (no display, no
OpenGL), and GIF/MP4 files of episodes.
"""

from diffsim.render.camera import Camera
from diffsim.render.raster import Renderer
from diffsim.render.scene import SceneRenderer, frames_of, render_state
from diffsim.render.video import write_video

__all__ = ["Camera", "Renderer", "SceneRenderer", "frames_of", "render_state", "write_video"]
