"""Thin launcher of the sds3d web app: `python apps/gradio_app.py [--host H] [--port P] [--share] [--out-root DIR]`.

The same as `sds3d app`; the app itself lives in the package (sds3d/app/).
"""

import sys

from sds3d.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
