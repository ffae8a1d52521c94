#!/usr/bin/env bash
# Download, into .whl/, the wheels bench/gpu.sh needs on the lent GPU machine (Python 3.12, no
# network; its image has torch, torchvision, numpy, scipy, scikit-learn, h5py, click, tqdm, PyYAML,
# matplotlib, pillow and huggingface-hub). Versions: those the test suite ran with here.
#   bash bench/gpu_wheels.sh && echo /.whl/ >> .git/info/exclude
# then, in the device call (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site && OUT=$OUT bash bench/gpu.sh
set -euo pipefail
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
  crc32c==2.9.post0 google-crc32c==1.9.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 ruamel.yaml==0.19.1 randaugment==1.0.2 pycocotools==2.0.11 \
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 \
  zict==3.0.0 lazy-importer==0.1.0
du -sh .whl
