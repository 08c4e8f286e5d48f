"""The full export (merge, f16, q4_k_m and every check) of a model in several shards needs far less memory than the
model: measured around export_gguf.py's process and every process it starts (bench/peak_memory.py).

The model is a random Mistral of 1.5 GB in bf16 (24 layers of width 1024, the real tokenizer's 32,000 tokens), built
in the test's temporary folder: big enough that the bound says something beside Python's and torch's own few hundred
MB, quick enough for two cores. The export before the streaming merge held the merged model in float16 and the checks'
reference in float32, 4.5 GB here.
"""

import subprocess
import sys

from bench import standins
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from peak_memory import measure  # noqa: E402

# hidden and intermediate sizes multiples of 256 (llama.cpp's k-quants); the MLPs hold most of the weights, so the
# largest single matrix (the 32,000-token embedding, 131 MB in float32) is small beside the model
SHAPE = dict(hidden_size=1024, intermediate_size=8192, num_attention_heads=8, num_key_value_heads=2)
LAYERS = 24

# What the export must fit: a standard Colab session (12.7 GB of RAM, less the 1 GB it uses: 11.7 GiB) for Mistral 7B
# (7.24 B parameters, 13.49 GiB in 16 bits). Python, torch and transformers in the export process take about 0.7 GiB
# whatever the model (0.71 to 1.30 GiB here at 1.36 GiB, 3.55 GiB at 13.49: about 0.7 at none); the rest of Colab's RAM
# is scaled to the model's size. At 7B the bound is Colab's RAM; here about 1.8 GiB, above every figure measured
# (bench/RESULTS.md, "test_export_memory's spread"), below what holding the merged model once more would take.
COLAB_RAM, MISTRAL_7B_BYTES, RUNTIME = 11.7 * 2**30, 7.24e9 * 2, 0.7 * 2**30


def colab_bound(model_bytes: int) -> float:
    return RUNTIME + (COLAB_RAM - RUNTIME) * model_bytes / MISTRAL_7B_BYTES


def test_the_full_export_peaks_well_below_the_models_size(tmp_path, capsys):
    base = standins.save_standin(tmp_path / "base", num_layers=LAYERS, device="cpu", config=SHAPE,
                                 max_shard_size="300MB")
    model_bytes = sum(f.stat().st_size for f in base.glob("model-*.safetensors"))
    assert len(list(base.glob("model-*.safetensors"))) >= 4
    adapter = standins.save_random_adapter(base, tmp_path / "adapter")
    out = tmp_path / "export"
    with open(tmp_path / "export.log", "w") as log:
        run = measure([sys.executable, "export_gguf.py", "--adapter_dir", str(adapter), "--export_dir", str(out),
                       "--gguf_types", "f16", "q4_k_m"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    assert run.returncode == 0, (tmp_path / "export.log").read_text()[-3000:]
    with capsys.disabled():
        print(f"\nmodel {model_bytes / 2**30:.2f} GiB (bf16, {LAYERS} layers); export {run.seconds:.0f} s: "
              f"peak anonymous memory {run.peak_anon / 2**30:.2f} GiB (whole process tree), largest RSS "
              f"{run.max_rss / 2**30:.2f} GiB (one process, memory-mapped GGUF pages included); at the peak: "
              f"{[(round(size / 2**30, 2), command[:70]) for size, command in run.at_peak]}")
    assert (out / "export_report.json").is_file() and (out / "model-q4_k_m.gguf").is_file()
    # what must fit in RAM: Colab's, scaled (colab_bound). The old export held 3.2 times the model.
    assert run.peak_anon < colab_bound(model_bytes), [(f"{size / 2**30:.2f} GiB", command) for size, command in
                                                      run.at_peak]
    # llama.cpp maps the f16 GGUF it checks (the model's size, in page cache): still below the float32 reference
    assert run.max_rss < 2 * model_bytes
