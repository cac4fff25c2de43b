"""The config schema: every field jaxlm reads, with its default and a comment.

Config files under `configs/` start from `defaults()` and change what they need. The returned
ConfigDict is locked, so a misspelt field in a config file or on the command line is an error,
never a silent no-op. Loading, overrides and validation live in `jaxlm/config.py`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from jaxlm import matmuls, objectives, parametrization
from jaxlm import model as model_lib

# Outermost first: 'data' changes slowest over the device list, 'tensor' fastest, so tensor
# parallelism (the most communication per step) lands on the closest devices.
MESH_AXES = ('data', 'fsdp', 'sequence', 'tensor')


# Architecture presets. A model field left unset (a typed placeholder: None until validation
# fills it, but still refusing a value of another type) takes its family's value, so
# `--config.model.family=llama` turns a GPT-2 config into a Llama-style one, while an explicit
# field (for example `--config.model.position=rope` on a gpt2 model) still wins.
FAMILIES = {
    'gpt2': dict(norm='layernorm', norm_position='pre', position='learned', mlp_activation='gelu',
                 gated_mlp=False, use_bias=True, tied_embeddings=True, norm_eps=1e-5,
                 head_transform=False, output_bias=False),
    'llama': dict(norm='rmsnorm', norm_position='pre', position='rope', mlp_activation='silu',
                  gated_mlp=True, use_bias=False, tied_embeddings=False, norm_eps=1e-5,
                  head_transform=False, output_bias=False),
    # BERT/RoBERTa: post-norm blocks, a normed embedding, and an MLM head that transforms the
    # final state (dense, GELU, LayerNorm) before the tied output layer with its own bias.
    'bert': dict(norm='layernorm', norm_position='post', position='learned',
                 mlp_activation='gelu_exact', gated_mlp=False, use_bias=True, tied_embeddings=True,
                 norm_eps=1e-12, head_transform=True, output_bias=True),
    # A modern encoder (ModernBERT, NeoBERT): pre-norm blocks, rotary positions, a gated GELU
    # MLP and no biases, keeping BERT's MLM transform and tied output. Train it with a higher
    # masking.rate (0.3) than BERT's. No Hugging Face layout: transformers' ModernBERT
    # alternates local and global attention, which this model does not.
    'modernbert': dict(norm='layernorm', norm_position='pre', position='rope',
                       mlp_activation='gelu', gated_mlp=True, use_bias=False,
                       tied_embeddings=True, norm_eps=1e-5, head_transform=True,
                       output_bias=False),
}


class Names:
  """A field's own values, then a registry's names, read whenever the field is checked: a kind
  registered later (by a plugin, or a test) is a choice too."""

  def __init__(self, own, registry):
    self.own, self.registry = own, registry

  def __iter__(self):
    return iter((*self.own, *self.registry))


# The allowed values of each field that names a choice. A registry's names are its keys: the
# registry owns them (a new kind is one module plus one registry line), nothing here lists them.
CHOICES = {
    'objective': objectives.REGISTRY,
    'nonfinite': ('skip', 'stop'),
    'model.family': tuple(FAMILIES),
    'model.norm': model_lib.NORMS,
    'model.norm_position': ('pre', 'post'),
    'model.position': ('learned', 'rope'),
    'model.rope_type': ('default', 'llama3'),
    'model.mlp_activation': model_lib.ACTIVATIONS,
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.attention': Names(('auto',), model_lib.ATTENTION),  # 'auto': one per platform.
    'model.context_parallel': ('none', 'allgather', 'ring'),  # jaxlm/model/context.py
    'model.matmul': matmuls.REGISTRY,
    'model.parametrization': parametrization.REGISTRY,  # Its names.
    'model.remat_policy': Names(('none',), model_lib.REMAT_POLICIES),  # 'none': no remat.
    'data.tokenizer_type': ('bpe', 'unigram'),
    'data.packing': ('split', 'first_fit'),
    'finetune.backbone': ('masked', 'causal'),
}


def defaults(family='gpt2'):
  """The complete config schema with its default values, as a locked ConfigDict."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # One seed for parameter init, dropout and data order.
  # 'causal' (next-token prediction), 'masked' (BERT-style masked tokens, see `masking`) or
  # 'classify' (sequence classification, see `finetune`; run it with `jaxlm finetune`).
  c.objective = 'causal'
  c.train_steps = 1000  # Number of optimizer updates.
  c.batch_size = 32  # Global batch, in sequences of model.max_len tokens, over all devices.
  c.log_every_steps = 50  # Write a metrics.jsonl row (and TensorBoard scalars) this often.
  c.eval_every_steps = 500  # Evaluate on held-out data this often; 0 = only at start and end.
  c.eval_batches = 8  # Held-out batches per evaluation (fewer if the split is smaller).
  c.z_loss = 0.0  # Weight of the log(Z)^2 penalty that keeps output logits small (PaLM: 1e-4).
  # Run the output layer and loss over this many sequence positions at a time, so the float32
  # logits of the whole batch never exist at once (large vocabularies); 0 = all at once.
  c.loss_chunk = 0
  # A step whose loss or gradient norm is not finite never applies its update; then 'skip'
  # goes on with the next batch, 'stop' saves the (good) state and stops with an error.
  c.nonfinite = 'skip'
  c.init_from = ''  # Start from the parameters of this checkpoint (a workdir or checkpoints/N).
  # Persistent XLA compilation cache, so a resumed run, eval or plan does not compile again:
  # 'auto' = $JAXLM_COMPILE_CACHE if set, else $XDG_CACHE_HOME/jaxlm/xla (~/.cache/jaxlm/xla);
  # or a directory (or gs:// URL); '' = off.
  c.compile_cache_dir = 'auto'

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.family = family  # Architecture preset: 'gpt2', 'llama' or 'bert'; fills the None fields.
  m.num_layers = 12  # Transformer blocks.
  m.emb_dim = 768  # Residual stream width.
  m.num_heads = 12  # Query heads.
  m.num_kv_heads = 0  # Key/value heads (grouped-query attention); 0 = num_heads.
  m.head_dim = 0  # Width of each head; 0 = emb_dim // num_heads.
  m.mlp_dim = 3072  # Hidden width of the MLP.
  m.vocab_size = 50304  # Output vocabulary; at least the tokenizer's size.
  m.max_len = 1024  # Training sequence length (and size of a learned position table).
  m.norm = placeholder(str)  # 'layernorm' or 'rmsnorm'. Unset (None) = the family's value.
  m.norm_eps = placeholder(float)  # Epsilon of the norms.
  m.norm_position = placeholder(str)  # 'pre' (norm, then attention/MLP) or 'post' (BERT).
  m.position = placeholder(str)  # 'learned' absolute embeddings or 'rope'.
  m.rope_theta = 10000.0  # RoPE base frequency (Llama 2: 1e4, Llama 3: 5e5).
  # 'default' or 'llama3': Llama 3.1's long-context frequency scaling, set by the four fields
  # below (the values here are Llama 3.1's); they are read only for 'llama3'.
  m.rope_type = 'default'
  m.rope_scaling_factor = 8.0  # Low frequencies turn this many times slower.
  m.rope_low_freq_factor = 1.0  # Wavelengths above original_max_len / this are scaled fully.
  m.rope_high_freq_factor = 4.0  # Wavelengths below original_max_len / this are not scaled.
  m.rope_original_max_len = 8192  # The context length the model was first trained at.
  m.mlp_activation = placeholder(str)  # 'gelu' (tanh approximation), 'gelu_exact', 'silu', 'relu'.
  m.gated_mlp = placeholder(bool)  # True for GLU-style MLPs (SwiGLU = silu + gated).
  m.use_bias = placeholder(bool)  # Biases in dense layers and LayerNorm.
  m.tied_embeddings = placeholder(bool)  # Share the input embedding with the output layer.
  m.head_transform = placeholder(bool)  # Dense + activation + norm before the output layer (BERT).
  m.output_bias = placeholder(bool)  # A bias on the output logits (BERT).
  m.type_vocab_size = 0  # Token-type (segment A/B) embeddings, as in BERT; 0 = none.
  m.dropout_rate = 0.0  # Dropout on embeddings and residual branches during training.
  m.init_std = 0.02  # Std of the normal init; residual output projections get /sqrt(2 L).
  m.dtype = 'float32'  # Compute dtype of activations ('bfloat16' on accelerators).
  m.param_dtype = 'float32'  # Storage dtype of parameters (the optimizer's master copy).
  # Every matmul of the model (jaxlm/matmuls): 'default' (lax's, in model.dtype), 'int8'
  # (int8 forward, backward in model.dtype), 'int8_grads' (int8 gradients too), 'fp8' (e4m3
  # forward, e5m2 gradients, current scaling) or 'fp8_delayed' (scales from an amax history).
  m.matmul = 'default'
  # Layers (matmuls.LAYERS) kept on the 'default' matmul whatever model.matmul says: the
  # output layer, as MaxText and torchtitan keep it; () puts every matmul in the kind.
  m.matmul_keep = ('output',)
  # How init, multipliers and each parameter's learning rate follow the width
  # (jaxlm/parametrization.py has the table): 'standard', or 'mup' (muP: hyperparameters tuned
  # at mup_base_width hold at any width; optimizer.learning_rate is the base model's).
  m.parametrization = 'standard'
  m.mup_base_width = 256  # muP: the emb_dim at which every width multiplier is 1.
  m.mup_base_head_dim = 64  # muP: the head_dim at which attention's 1/head_dim is 1/sqrt(head_dim).
  m.mup_input_multiplier = 1.0  # muP alpha_in: multiplies the embeddings' output (tunable).
  m.mup_output_multiplier = 1.0  # muP alpha_out: the logits are x alpha_out * base / emb_dim.
  # muP depth scaling (CompleteP): residual branches x mup_base_depth / num_layers; 0 = off.
  m.mup_base_depth = 0
  # Attention kernel (jaxlm/model/attention.py): 'xla' (materialises the scores), 'cudnn'
  # (flash attention, NVIDIA GPUs), 'splash' (Pallas, TPU; interpret mode elsewhere, slow);
  # 'auto' = splash on TPU, cudnn on NVIDIA GPUs for 16-bit compute, xla otherwise.
  m.attention = 'auto'
  m.splash_block_q = 0  # Splash query tile, a multiple of 128; 0 = min(512, length).
  m.splash_block_kv = 0  # Splash key/value tile, a multiple of 128; 0 = min(512, length).
  m.cudnn_max_documents = 64  # cuDNN, packed rows: documents per row (more: a NaN step).
  # Attention over sequences split along mesh.sequence (jaxlm/model/context.py): 'none' (the
  # compiler gathers each layer's keys and values), 'allgather' (gathered once per layer, then
  # visited block by block) or 'ring' (key/value blocks passed around the axis while the
  # previous block computes: memory O(length / mesh.sequence)). Needs mesh.sequence > 1.
  m.context_parallel = 'none'
  # Causal models: lay each sequence out in 2 x mesh.sequence chunks, device i holding chunks i
  # and 2 x mesh.sequence - 1 - i, so that every device does the same attention work.
  m.context_parallel_load_balance = True
  m.scan_layers = True  # Stack the blocks with scan: compile time independent of depth.
  # Activation recomputation in the backward pass: 'none' keeps everything; 'full' keeps only
  # each block's input; 'minimal' keeps the projections' outputs (recomputing norms and
  # attention); 'save_qkv_proj' only q, k, v; 'offload' = 'minimal' kept in host memory
  # (GPU/TPU); 'dots_saveable' / 'dots_with_no_batch_dims' are JAX's matmul-based policies.
  m.remat_policy = 'none'

  c.optimizer = ml_collections.ConfigDict()
  o = c.optimizer
  o.learning_rate = 3e-4  # Peak learning rate, reached at the end of warmup.
  o.warmup_steps = 100  # Linear warmup from 0 to the peak.
  o.end_lr_fraction = 0.1  # The cosine decays to this fraction of the peak at train_steps.
  o.b1 = 0.9  # AdamW first-moment decay.
  o.b2 = 0.95  # AdamW second-moment decay.
  o.eps = 1e-8  # AdamW epsilon.
  o.weight_decay = 0.1  # Decoupled weight decay; never applied to norms and biases.
  o.grad_clip = 1.0  # Clip the global gradient norm to this; 0 = no clipping.
  o.grad_accum_steps = 1  # Split each batch into this many sequential micro-batches.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # Data-parallel axis (replicated parameters). -1 = all remaining devices.
  c.mesh.fsdp = -1  # Fully sharded data-parallel axis (ZeRO-3 parameter sharding).
  c.mesh.tensor = 1  # Tensor-parallel axis (Megatron-style heads/MLP/vocab split).
  c.mesh.sequence = 1  # Sequence axis: activations split along the length dimension.
  # The same axes across slices (TPU multi-slice) or nodes (GPU), over the slower network.
  c.mesh.dcn_data = -1  # Data parallelism across slices: -1 = all slices.
  c.mesh.dcn_fsdp = 1  # FSDP across slices (more traffic than data parallelism).
  c.mesh.dcn_sequence = 1  # Sequence parallelism across slices (rarely useful).
  c.mesh.dcn_tensor = 1  # Tensor parallelism across slices (almost never useful).
  # Logical axis -> mesh axes. The first rule whose mesh axes are still free in an array wins.
  c.mesh.rules = (
      ('batch', ('data', 'fsdp')),
      ('length', 'sequence'),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('kv', None),
      ('layers', None),
  )

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.path = ''  # Globs (comma-separated) of text, .jsonl and .parquet files; '' = Python stdlib.
  d.tfds_name = ''  # A TFDS dataset (e.g. 'lm1b', 'wikipedia/20230601.en') instead of data.path.
  d.tfds_split = 'train'  # Its split that documents come from (validation is held out of it).
  d.text_field = 'text'  # The JSONL field, Parquet column or TFDS feature of a document's text.
  # Several sources mixed by weight, replacing path/tfds_name: ((weight, source), ...), a
  # source being globs as in data.path or 'tfds:NAME[:SPLIT]'. () = no mixture.
  d.mixture = ()
  # A sentencepiece .model or Hugging Face tokenizer.json to use; '' = train a sentencepiece
  # model, cached in the workdir.
  d.tokenizer = ''
  d.tokenizer_type = 'bpe'  # Sentencepiece algorithm when training one: 'bpe' or 'unigram'.
  d.tokenizer_sample_bytes = 20_000_000  # Text sampled from the corpus to train it.
  d.validation_fraction = 0.02  # Share of documents held out (chosen by a hash of their name).
  d.cache_dir = ''  # Where the tokenized corpus is cached; '' = <workdir>/data.
  # Input bytes per token shard: the unit of work of a tokenizing process, and of resuming.
  d.shard_bytes = 256_000_000
  # How documents fill rows: 'split' concatenates and cuts (no padding, most documents cut);
  # 'first_fit' places whole documents (long ones in max_len pieces) first-fit decreasing.
  d.packing = 'split'
  # Row length by phase of the run (jaxlm/phases.py): ((end, length), ...), each phase running
  # until `end` (a fraction of train_steps) on rows of `length` tokens, e.g. BERT's
  # ((0.9, 128), (1.0, 512)); the last ends at 1.0, the longest is model.max_len. () = one phase.
  d.phases = ()
  d.max_documents = 0  # Use at most this many documents (0 = all); for quick experiments.
  d.num_threads = 2  # Threads reading and assembling batches ahead of the step.
  d.prefetch = 4  # Batches prepared ahead of the step.

  c.masking = ml_collections.ConfigDict()  # For objective='masked'; drawn anew every step.
  c.masking.rate = 0.15  # Share of (non-special) tokens chosen for prediction.
  c.masking.mask_fraction = 0.8  # Of the chosen tokens, the share replaced by [MASK] ...
  c.masking.random_fraction = 0.1  # ... and by a random token; the rest stay unchanged.
  c.masking.whole_word = False  # Choose whole words (a word starts at a '▁' piece), not pieces.
  # Positions per row that the output head and the loss run on (NVIDIA's BERT:
  # max_predictions_per_seq): the chosen tokens are gathered first, so the vocabulary-wide
  # head costs a fraction of every-position prediction. 0 = sized from the rate and length
  # with headroom (config.max_predictions); -1 = every position (no gathering). A row that
  # draws more than the cap keeps its leftmost chosen tokens; the rest stay unmasked inputs.
  c.masking.max_predictions = 0

  c.finetune = ml_collections.ConfigDict()  # For objective='classify' (`jaxlm finetune`).
  c.finetune.train = ''  # Labeled .jsonl/.csv file(s) (glob), or 'tfds:NAME:SPLIT' (glue/sst2).
  c.finetune.validation = ''  # The same for the split that accuracy is reported on.
  c.finetune.text_field = 'text'  # Field (JSONL key, CSV column, TFDS feature) of the text.
  c.finetune.label_field = 'label'  # Field of the label (a class name or an integer).
  c.finetune.labels = ()  # Class names in id order; () = the sorted labels of the train split.
  # The pretraining objective of the model being fine-tuned: 'masked' classifies from the
  # first ([CLS]) token of a bidirectional model, 'causal' from the last token of a decoder.
  c.finetune.backbone = 'masked'

  c.distributed = ml_collections.ConfigDict()  # Multi-process runs; see jaxlm/distributed.py.
  c.distributed.coordinator = ''  # host:port of process 0; '' = environment or cluster.
  c.distributed.num_processes = 0  # Processes in the run; 0 = environment or cluster.
  c.distributed.heartbeat_timeout_s = 300  # A process whose peer died exits after this long.
  # The longest one process waits for the others at a step (the chief tokenizing the corpus).
  c.distributed.barrier_timeout_s = 3600.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every_steps = 1000  # Save the train state this often (and at the end).
  c.checkpoint.keep = 3  # Keep the newest N checkpoints.
  c.checkpoint.keep_every_steps = 0  # Also keep every checkpoint whose step is a multiple; 0 = no.
  # A host-local directory (local SSD, /dev/shm) where each process saves its own shards every
  # local_every_steps (the newest 2 kept): a restart resumes from there when every process
  # has its copy. '' = the workdir only. See README "Checkpoints, resuming, preemption".
  c.checkpoint.local_dir = ''
  c.checkpoint.local_every_steps = 0  # Save to local_dir this often; needs local_dir.

  # Where metrics go besides metrics.jsonl and TensorBoard (always written).
  c.metrics = ml_collections.ConfigDict()
  # Weights & Biases project to log to ('' = no W&B). Needs `pip install wandb` and a login
  # (`wandb login`, or WANDB_API_KEY); WANDB_MODE=offline logs to <workdir>/wandb/ only.
  c.metrics.wandb_project = ''
  c.metrics.wandb_entity = ''  # The W&B team or user; '' = the login's default.
  c.metrics.wandb_run_name = ''  # The run's display name; '' = the workdir's name.

  # lm-eval-harness tasks (`pip install -e ".[eval]"`) during training, on the training mesh;
  # `jaxlm eval --tasks=...` runs them on a checkpoint. Results: metrics rows
  # lm_eval/<task>/<metric> and <workdir>/lm_eval/step_<N>.json.
  c.lm_eval = ml_collections.ConfigDict()
  c.lm_eval.tasks = ''  # Comma-separated lm-eval task names; '' = none during training.
  c.lm_eval.every_steps = 0  # Also run them every this many steps; 0 = only at the end.
  c.lm_eval.num_fewshot = -1  # Few-shot examples per prompt; -1 = each task's own default.
  c.lm_eval.limit = 0  # At most this many examples per task; 0 = all.
  c.lm_eval.include_path = ''  # A directory of task YAML files of your own (local data).
  c.lm_eval.batch_size = 8  # Sequences per scoring batch (rounded up to the batch's devices).

  # A jax.profiler trace of a window of steps, under <workdir>/tensorboard/plugins/profile/
  # (TensorBoard's profile tab, xprof). A file named PROFILE in the workdir, or SIGUSR1, also
  # starts one num_steps window (num_steps or 3 if 0) at the next step, without a restart.
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 10  # The window starts after this many steps (past compilation).
  c.profile.num_steps = 0  # Steps in the window; 0 = no scheduled trace.
  c.profile.every_steps = 0  # Repeat the window every this many steps; 0 = once.
  c.profile.all_hosts = False  # Trace every process, not just the chief (process 0).
  c.lock()
  return c


def sweep_defaults(base=None):
  """The schema of a scaling-law sweep (`jaxlm sweep`, configs/scaling/): a base run config and
  the rules that turn it into one run per (model size, compute budget) or (size, token count)."""
  s = ml_collections.ConfigDict()
  s.base = base if base is not None else defaults()  # Every run starts from this run config.
  # Model shapes of the family, ((num_layers, emb_dim), ...); the other sizes follow by rule:
  s.sizes = ()
  s.head_dim = 64  # num_heads = emb_dim // head_dim.
  s.mlp_ratio = 4.0  # mlp_dim = mlp_ratio * emb_dim, rounded up to a multiple of 8.
  # Either isoFLOP budgets, training FLOPs C per run (each size trains C / FLOPs-per-token
  # tokens), or a grid of token counts D (each size trains on each); set exactly one.
  s.budgets = ()
  s.tokens = ()
  s.min_steps = 50  # Leave out runs shorter than this (the largest sizes at small budgets)...
  s.max_steps = 0  # ...and longer than this (the smallest at large budgets); 0 = no limit.
  # Peak learning rate by width: learning_rate * (lr_reference_width / emb_dim)
  # ** lr_width_exponent (0 = the same for every size). With base.model.parametrization='mup'
  # the exponent must be 0: muP scales each parameter's rate itself (jaxlm/parametrization.py).
  s.learning_rate = 3e-3
  s.lr_reference_width = 256
  s.lr_width_exponent = 1.0
  s.warmup_fraction = 0.05  # Warmup steps as a share of each run's train_steps.
  # Batch by compute: base.batch_size * (C / smallest C) ** batch_compute_exponent, rounded
  # to a power-of-two multiple of base.batch_size (0 = one batch size for all runs).
  s.batch_compute_exponent = 0.0
  # Tune once, at one size, and carry the winner to every size (jaxlm/sweep.py): the sweep
  # first trains the grid of these values (their product; an empty one stays as configured)
  # at tune.size, then every run uses the values of the grid's lowest held-out loss, the
  # learning rate by the width rule above (muP: as it is, base.model.parametrization='mup').
  s.tune = ml_collections.ConfigDict()
  s.tune.learning_rates = ()  # Peak learning rates (the rate at tune.size's width).
  s.tune.input_multipliers = ()  # muP alpha_in values (base.model.mup_input_multiplier).
  s.tune.output_multipliers = ()  # muP alpha_out values (base.model.mup_output_multiplier).
  s.tune.init_stds = ()  # base.model.init_std values.
  s.tune.size = ()  # (num_layers, emb_dim) of sizes the grid trains; () = the smallest.
  s.tune.tokens = 0.0  # Training tokens of each grid run; 0 = that size's longest run's.
  # Held-out runs, ((num_layers, emb_dim, C), ...) (C a token count D in a token grid):
  # trained after the others and left out of `jaxlm fit`'s law, which predicts their loss.
  s.holdout = ()
  s.lock()
  return s
