"""Environment variable names the launcher (local backend or operator) sets on trainer processes.

The trainer reads them once, through its settings class; the launchers write them through
`tinkerkube_contract.launch.trainer_env`. torchrun's own variables (RANK, WORLD_SIZE, ...) are not
listed: torchrun sets them.
"""

PREFIX = "TINKERKUBE_TRAINER_"

BASE_MODEL = PREFIX + "BASE_MODEL"  # the pool's resident base model
MAX_RUNS = PREFIX + "MAX_RUNS"  # runs the pool holds at once
MAX_LORA_RANK = PREFIX + "MAX_LORA_RANK"
SHARDING = PREFIX + "SHARDING"  # replicate | fsdp
SAMPLER = PREFIX + "SAMPLER"  # hf | vllm
AUTO_CHECKPOINT_STEPS = PREFIX + "AUTO_CHECKPOINT_STEPS"  # a run's weights + optimizer every N optim_steps
# A run attached at boot (a pool started for one run), optional:
MODEL_ID = PREFIX + "MODEL_ID"
MODE = PREFIX + "MODE"  # train | sample
LORA = PREFIX + "LORA"  # JSON of LoraSpec
RESTORE_FROM = PREFIX + "RESTORE_FROM"  # tinker:// path, optional
RESTORE_OPTIMIZER = PREFIX + "RESTORE_OPTIMIZER"  # "true" | "false"
CHECKPOINT_DIR = PREFIX + "CHECKPOINT_DIR"  # root of the checkpoint store
PASS_JOURNAL = PREFIX + "PASS_JOURNAL"  # rank 0's journal of the running pass; the same file for a restarted pool
MODEL_CACHE_DIR = PREFIX + "MODEL_CACHE_DIR"  # where built-in models are materialised
MODEL_ALIASES = PREFIX + "MODEL_ALIASES"  # JSON {name: name-or-dir}
HOST = PREFIX + "HOST"
PORT = PREFIX + "PORT"
AUTH_TOKEN = PREFIX + "AUTH_TOKEN"
DEVICE = PREFIX + "DEVICE"  # auto | cpu | cuda
SHARDING = PREFIX + "SHARDING"  # replicate | fsdp: how the pool's ranks hold the base model
LOG_LEVEL = PREFIX + "LOG_LEVEL"
SAMPLER = PREFIX + "SAMPLER"  # hf | vllm: the pool's sampler backend
