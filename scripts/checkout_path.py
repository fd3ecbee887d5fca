#!/usr/bin/env python
"""Puts this checkout's ``python/`` on the path of the Python that runs it: a ``lrpcpp-checkout.pth``
file in its site-packages (``make`` runs it for ``.venv``). ``python -m lrpcpp`` and ``import lrpcpp``
then find the package built in place, from any directory, with no ``PYTHONPATH``; a wheel installed
into the same environment comes first on the path.
"""

import os
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    path = os.path.join(sysconfig.get_path("purelib"), "lrpcpp-checkout.pth")
    line = os.path.join(ROOT, "python") + "\n"
    if not os.path.exists(path) or open(path).read() != line:
        with open(path, "w") as f:
            f.write(line)
