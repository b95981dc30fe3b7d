"""The first code a task runs inside the cluster's container: `python3 -u container_boot.py
--image IMAGE -u -m submitit.core._submit FOLDER` (submitit appends the part after IMAGE).

It puts the task runtime (the folder two levels up: glmsnake, submitit, cloudpickle) first
on sys.path, checks the image's Python, and runs submitit's entry point. Standard library
only and old syntax on purpose: it must say what is wrong even on an unsuitable Python.
"""

import os
import runpy
import sys

MIN_PYTHON = (3, 10)


def main(argv):
    image = "the container image"
    if argv[:1] == ["--image"] and len(argv) > 1:
        image, argv = argv[1], argv[2:]
    os.environ["GLMSNAKE_CONTAINER_IMAGE"] = image
    here = os.path.dirname(os.path.abspath(__file__))
    runtime = os.path.dirname(os.path.dirname(here))
    # Run as a script, its own folder came first on sys.path: the runtime's root goes there, and its
    # fallback folder (typing_extensions) last, so that the image's own copy wins where it has one.
    sys.path[:] = ([runtime] + [p for p in sys.path if os.path.abspath(p or ".") != here]
                   + [os.path.join(runtime, "fallback")])
    if sys.version_info[:2] < MIN_PYTHON:
        sys.stderr.write(
            "glmsnake: error: %s runs Python %d.%d (%s); glmsnake's tasks need Python %d.%d or newer\n"
            "  fix: use an image with a newer python3, e.g. slime's own image\n"
            % (image, sys.version_info[0], sys.version_info[1], sys.executable, MIN_PYTHON[0], MIN_PYTHON[1]))
        return 2
    while argv[:1] == ["-u"]:  # python's own flag (submitit passes it), already applied to this process
        argv = argv[1:]
    if len(argv) < 2 or argv[0] != "-m":
        sys.stderr.write("glmsnake: error: container_boot.py expects `-m MODULE ARGS...`, got %r\n" % (argv,))
        return 2
    module = argv[1]
    sys.argv = [module] + argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
