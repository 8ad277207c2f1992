"""Graph input/output names, named dims and tensor naming: the one place the ONNX export, the
manifest, TensorRT profiles and the runtime take them from (names follow onnxruntime-genai's).
The order of the cache inputs and outputs in a graph is the KV layout's (kv.py). Plain strings
and arithmetic only (no imports), so every side of the format can use it."""

INPUT_IDS = "input_ids"  # int64 (batch, sequence)
POSITION_IDS = "position_ids"  # int64 (batch, sequence): the cache slot of each new token
SEQ_LENS = "seq_lens"  # int64 (batch,): valid tokens per sequence after this step
# int64 (batch, picked), prefill graph only: the positions of this step (0..sequence-1) whose
# logits the graph returns; the runtime feeds each row's last real token, or every position
# (scoring, checking proposed tokens). The LM head runs on the picked positions only, so the
# last-token path costs what it did when the graph computed the index itself.
LOGITS_INDEX = "logits_index"
# float32: decode (batch, vocab), the one new token of each sequence; prefill (batch, picked,
# vocab), at logits_index.
LOGITS = "logits"
# int32 scalar, `ort` bundles only: GroupQueryAttention's total_sequence_length, which ONNX
# Runtime reads on the host: max(seq_lens), or max_seq_len for a decode step captured as a CUDA
# graph (its value is baked into the capture). A graph input rather than ReduceMax(seq_lens) so
# no device-to-host copy sits in the graph (onnxruntime-genai derives it from a shape likewise).
TOTAL_SEQ_LEN = "total_seq_len"
GQA_TOTAL_SEQ_LEN_INPUT = 6  # the input of GroupQueryAttention (total_sequence_length) it feeds
# int64 (batch, total_length), genai.onnx only (onnxruntime-genai's decoder contract): 1 for
# every token a sequence holds after this step, 0 for right padding. The graph derives seq_lens
# (its row sums), GroupQueryAttention's total_sequence_length (its width, a shape: no copy to
# the host) and the positions whose logits it returns (each row's last real token).
ATTENTION_MASK = "attention_mask"

BATCH = "batch"
SEQUENCE = "sequence"
PICKED = "picked"  # the positions of a prefill step whose logits are returned
TOTAL_LENGTH = "total_sequence_length"  # genai.onnx: the attention mask's width
MAX_LENGTH = "max_length"  # genai.onnx: cache slots, onnxruntime-genai's search.max_length (<= max_seq_len)

PREFILL, DECODE = "prefill", "decode"
# `ort` bundles' third graph: onnxruntime-genai's decoder contract (one graph for both phases),
# reading the same weights.bin, with the genai_config.json that its runtime opens.
GENAI = "genai"
GENAI_CONFIG = "genai_config.json"
WEIGHTS_FILE = "weights.bin"
TRANSPOSED = ".T"  # suffix of weights.bin tensors stored transposed ([in, out]) for MatMul
ROPE_COS, ROPE_SIN = "rope_cos", "rope_sin"  # (max_seq_len, head_dim / 2) in the model dtype


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def quantized(checkpoint: str, role: str, bits: int) -> str:
    """The weights.bin name of one stored tensor of quantized checkpoint weight `checkpoint`, by
    role (bundle/quant.py ROLES): `{checkpoint}.q{bits}` for the codes, `.q{bits}.rows` for the
    rows view of the same bytes, `.scales`, `.offsets`, `.zero_points`."""
    codes = f"{checkpoint}.q{bits}"
    return {"codes": codes, "rows": f"{codes}.rows"}.get(role, f"{checkpoint}.{role}")


def transposed(name: str) -> str:
    """The weights.bin name of checkpoint tensor `name` stored transposed ([in, out])."""
    return name + TRANSPOSED


def checkpoint_name(stored: str) -> tuple[str, bool]:
    """(checkpoint tensor name, stored transposed?) of a weights.bin tensor name."""
    if stored.endswith(TRANSPOSED):
        return stored[: -len(TRANSPOSED)], True
    return stored, False


def logits_index(seq_lens, position_ids):
    """Position in this step of each sequence's last real token, (batch,): what a step's logits
    are taken at by default. Works on numpy arrays and torch tensors alike (the decode graph
    traces it, the runtime feeds it to prefill as (batch, 1), the reference runs it)."""
    return seq_lens - 1 - position_ids[:, 0]
