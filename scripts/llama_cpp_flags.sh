# Sourced by install_llama_cpp.sh and install_llama_server.sh: the llama-cpp-python version, the CPU flags llama.cpp
# is compiled with, and the cache folder named after both (the bindings' wheel and llama-server are kept there).
#
# The flags are fixed (x86-64-v3: AVX, AVX2, FMA, F16C, BMI2; no AVX-512, no AMX) rather than llama.cpp's default
# GGML_NATIVE=ON (-march=native), whose build uses every instruction the build machine's CPU advertises and dies with
# SIGILL on a machine without them. LLAMA_CPP_CMAKE_ARGS adds flags (e.g. "-DGGML_CUDA=on"); they change the folder.
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
if [ "$(uname -m)" = x86_64 ]; then
  FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  FLAGS="$FLAGS -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
else
  FLAGS="-DGGML_NATIVE=OFF"  # the architecture's baseline (armv8 on Arm)
fi
FLAGS="$FLAGS ${LLAMA_CPP_CMAKE_ARGS:-}"
TAG=$(printf '%s' "$FLAGS" | sha256sum | cut -c1-12)
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/qlora-mistral/llama-cpp-python-$VERSION-$TAG"
