"""Single-image inference: ``python inference.py --model_path CKPT --image_path IMG``."""

import sys

from cxrclip.infer import main

if __name__ == "__main__":
    sys.exit(main())
