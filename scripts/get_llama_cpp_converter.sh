#!/bin/sh
# llama.cpp's Hugging Face -> GGUF converters (convert_hf_to_gguf.py for models, convert_lora_to_gguf.py for PEFT
# LoRA adapters, their conversion/ package and their own gguf-py), taken from llama-cpp-python's source distribution:
# no git clone, no cmake, and the converters match the llama.cpp that llama-cpp-python runs. PyPI's gguf package lags
# behind the scripts (it lacks LazyChunkedTensor), hence gguf-py.
#
#   sh scripts/get_llama_cpp_converter.sh [DEST]      # DEST defaults to .llama.cpp (git-ignored by its own .gitignore)
#
# PYTHON (default: python) picks the interpreter whose llama-cpp-python version is matched; LLAMA_CPP_PYTHON_VERSION
# overrides that version.
set -eu

PYTHON=${PYTHON:-python}
DEST=${1:-.llama.cpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')}
ROOT="llama_cpp_python-$VERSION/vendor/llama.cpp"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work"
tar -xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work" \
    "$ROOT/convert_hf_to_gguf.py" "$ROOT/convert_lora_to_gguf.py" "$ROOT/conversion" \
    "$ROOT/gguf-py/gguf" "$ROOT/gguf-py/LICENSE" "$ROOT/LICENSE"
echo "$VERSION" > "$work/$ROOT/VERSION"
echo '*' > "$work/$ROOT/.gitignore"

# Swap in the finished folder: an interrupted run never leaves a half-extracted converter under DEST.
rm -rf "$DEST.old"
[ ! -e "$DEST" ] || mv "$DEST" "$DEST.old"
mv "$work/$ROOT" "$DEST"
rm -rf "$DEST.old"
echo "llama.cpp converter from llama-cpp-python $VERSION in $DEST"
