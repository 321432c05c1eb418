"""Configuration of ELECTRA with Mixture-of-Experts feed-forward layers.

`num_experts=1` is plain ELECTRA (same parameters, same names as transformers' ELECTRA), so the dense
baseline and every MoE variant share one code path and one checkpoint format.
"""

from __future__ import annotations

import copy
from dataclasses import Field, field, fields
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import ElectraConfig

ROUTER_TYPES = ("softmax_topk", "noisy_topk", "expert_choice")
EXPERT_CHOICE_SCOPES = ("sequence", "batch")
# Zhou et al. (2022): each expert takes capacity_factor x tokens / experts tokens; 2 costs what top-2 costs.
EXPERT_CHOICE_CAPACITY_FACTOR = 2.0
MOE_IMPLEMENTATIONS = ("auto", "loop", "grouped_mm")
# "electra": google-research/electra's fine-tuning head ([CLS] state, dropout, one dense layer to the labels);
# "hf": transformers' ElectraClassificationHead (dense, gelu, dense). "hf" is what a config without the field
# was trained with.
CLASSIFIER_HEADS = ("electra", "hf")

# Switch Transformer (Fedus et al. 2021) load-balancing and ST-MoE (Zoph et al. 2022) router z-loss weights.
SWITCH_AUX_LOSS_COEF = 0.01
ST_MOE_Z_LOSS_COEF = 0.001


# --- The MoE hyperparameters: each declared once, as a field of ElectraMoEConfig below -------------------------
# A field made with `hyperparameter(...)` is a command-line flag of the same name (wikitext_trainer.py, and
# those convert_bert_checkpoint.py names), with the field's default and type and the help given here. Its kind
# says how a run treats it:
ARCHITECTURE = (
    "architecture"  # saved in config.json; a checkpoint continued from (--init_discriminator_from) fixes it
)
ROUTER_TRAINING = (
    "router_training"  # saved in config.json, but how the router trains: a continued run sets it
)
# `changeable_on_resume=True` lets a resumed run change it (run_state.check_resume_args); none does so today.
# The size fields are ElectraConfig's; PRESETS below declares them (flags that override the preset).


def hyperparameter(
    default: Any,
    kind: str,
    help: str | None = None,
    choices: tuple[str, ...] | None = None,
    changeable_on_resume: bool = False,
) -> Any:
    """A config field that is also a command-line flag (see above)."""
    metadata = dict(kind=kind, help=help, choices=choices, changeable_on_resume=changeable_on_resume)
    return field(default=default, metadata=metadata)


# Model sizes from the ELECTRA paper (Clark et al. 2020, Table 6); `tiny` is for tests and CPU runs.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, embedding_size=128
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=12,
        num_attention_heads=4,
        intermediate_size=1024,
        embedding_size=128,
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        embedding_size=768,
    ),
    "large": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        embedding_size=1024,
    ),
}
# Pretraining defaults per size, the trainer's one table: `learning_rate` and `mask_prob` are the defaults of
# --learning_rate and --mask_prob, ELECTRA's (configure_pretraining.py and the paper's Table 6: small 5e-4;
# base and large 2e-4; mask_prob 0.15, large 0.25). ELECTRA's batch size and sequence length per size are not
# defaults: the study keeps --batch_size 128 and --max_seq_length 128 for every size (docs/pretraining.md,
# "Presets", says why).
ELECTRA_PRETRAINING: dict[str, dict[str, float]] = {
    "tiny": dict(learning_rate=5e-4, mask_prob=0.15),
    "small": dict(learning_rate=5e-4, mask_prob=0.15),
    "base": dict(learning_rate=2e-4, mask_prob=0.15),
    "large": dict(learning_rate=2e-4, mask_prob=0.25),
}
# Generator width as a fraction of the discriminator's (ELECTRA paper, Section 3.2 and Table 6).
GENERATOR_SIZE_BY_PRESET = {"tiny": 1 / 4, "small": 1 / 4, "base": 1 / 3, "large": 1 / 4}
# ELECTRA-Small uses 128-token sequences, Base 512.
MAX_POSITION_EMBEDDINGS = 512


def preset_name(hidden_size: int | None, num_hidden_layers: int | None) -> str | None:
    """The preset with this width and depth (how a saved config's size is named), or None."""
    for name, preset in PRESETS.items():
        if (preset["hidden_size"], preset["num_hidden_layers"]) == (hidden_size, num_hidden_layers):
            return name
    return None


# Settings only an MoE layer reads; and those one router ignores (expert choice: experts pick their tokens, so
# no top-k and no load-balancing loss; token choice: no expert-choice scope).
MOE_ONLY_SETTINGS = (
    "top_k",
    "moe_layers",
    "moe_layer_frequency",
    "expert_intermediate_size",
    "capacity_factor",
    "router_type",
    "expert_choice_scope",
    "norm_topk_prob",
    "router_jitter_noise",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "moe_implementation",
)
IGNORED_BY_ROUTER = {
    "expert_choice": ("top_k", "router_aux_loss_coef"),
    "softmax_topk": ("expert_choice_scope",),
    "noisy_topk": ("expert_choice_scope",),
}


def ignored_settings_error(
    given: dict[str, Any], num_experts: int, router_type: str, prefix: str = "--"
) -> str | None:
    """A message naming the explicitly `given` settings (name -> value) that the layout or router would
    ignore, or None. Such settings are refused rather than stored in a config that does not use them: the
    trainer, the converter and run_study all call this with the values a user set."""
    if num_experts == 1:
        # top_k 1 is what a dense config stores (one FFN per token), so it is not refused.
        unused = [name for name in given if name in MOE_ONLY_SETTINGS and (name, given[name]) != ("top_k", 1)]
        why = f"num_experts 1 is the dense model (no MoE layer reads {'it' if len(unused) == 1 else 'them'})"
    else:
        unused = [name for name in given if name in IGNORED_BY_ROUTER.get(router_type, ())]
        why = f"router_type {router_type} ignores {'it' if len(unused) == 1 else 'them'}" + (
            " (each expert picks its tokens; their number is set by capacity_factor)"
            if router_type == "expert_choice"
            else ""
        )
    if not unused:
        return None
    names = ", ".join(f"{prefix}{name} {given[name]}" for name in unused)
    return (
        f"{names}: {why}; drop {'it' if len(unused) == 1 else 'them'}, or choose a layout/router that uses it"
    )


@strict
class ElectraMoEConfig(ElectraConfig):
    r"""ELECTRA configuration plus the Mixture-of-Experts fields.

    Args:
        num_experts: experts per MoE layer; 1 keeps ELECTRA's dense feed-forward block.
        top_k: experts each token is routed to (clipped to 1 when `num_experts=1`); ignored by
            `router_type="expert_choice"`.
        moe_layers: encoder layer indices that get an MoE block; `None` means every
            `moe_layer_frequency`-th layer (default: all layers).
        moe_layer_frequency: with `moe_layers=None`, layers `i` with `i % frequency == frequency - 1` are MoE.
        expert_intermediate_size: hidden width of each expert; defaults to `intermediate_size`.
        capacity_factor: `None` routes every token (dropless); a float limits each expert to
            `ceil(capacity_factor * tokens * top_k / num_experts)` slots and tokens over capacity keep
            only the residual path (Switch Transformer behaviour). With `router_type="expert_choice"` it is
            each expert's share, `ceil(capacity_factor * routable tokens / num_experts)` tokens, and `None`
            becomes 2.0 (the compute of top-2 token choice).
        router_type: `"softmax_topk"` (softmax over all experts, then top-k), `"noisy_topk"` (Shazeer et
            al. 2017 noisy top-k gating, as in the original study; noise while training only) or
            `"expert_choice"` (Zhou et al. 2022: each expert takes the tokens with the highest softmax
            score for it; a token's output is the score-weighted sum over the experts that took it, zero
            experts leave only the residual path; no load-balancing loss, the z-loss stays).
        expert_choice_scope: where expert-choice experts pick their tokens: `"sequence"` (default: within
            each sequence, so a sequence's output does not depend on its batch-mates) or `"batch"` (over
            all real tokens of the batch, as in Zhou et al.; predictions then depend on the batch).
        norm_topk_prob: renormalise each token's gate weights to sum to one (over its top-k experts, or
            over the experts that took it with expert choice). Default False, as Switch/GShard top-k and
            Zhou et al.'s expert choice use the raw softmax scores; set it True to make an upcycled model
            compute the dense function on every token that some expert takes.
        router_jitter_noise: multiplicative input jitter for the router while training (Switch Transformer).
        router_aux_loss_coef: weight of the Switch load-balancing loss `E * sum_e f_e * P_e`, where `f_e` is
            expert e's share of all routed top-k slots (the shares sum to 1, Megatron-LM's convention) and
            `P_e` its mean router probability. At top-k this is 1/k of transformers'
            `load_balancing_loss_func` (Mixtral, Qwen-MoE: shares per top-k rank, summing to k) for the same
            logits: at top-2 half, so the same coefficient pushes half as hard here; use `k * c` here for
            a coefficient `c` from there (tested in tests/test_pretrain_examples.py). At top-1 both are
            Switch's loss.
        router_z_loss_coef: weight of the ST-MoE router z-loss.
        output_router_logits: also return each MoE layer's router logits.
        moe_implementation: expert dispatch; `"auto"` takes `grouped_mm` where torch has a fused kernel for
            it (CUDA compute capability 9.x/10.x in bf16, aligned sizes) and the sorted-slice `loop` elsewhere.
        model_size: name of the preset the config came from (informational, used by result tables).
        classifier_head: sequence-classification head, one of `CLASSIFIER_HEADS`: `"electra"` (ELECTRA's
            fine-tuning head) or `"hf"` (transformers' `ElectraClassificationHead`, the default).
    """

    model_type = "electra_moe"

    num_experts: int = hyperparameter(1, ARCHITECTURE, "experts per MoE layer (1 = dense ELECTRA)")
    top_k: int = hyperparameter(2, ARCHITECTURE, "experts per token")
    moe_layers: list[int] | None = hyperparameter(
        None, ARCHITECTURE, "encoder layers with an MoE block (default: all)"
    )
    moe_layer_frequency: int = hyperparameter(1, ARCHITECTURE, "every n-th layer is MoE")
    expert_intermediate_size: int | None = hyperparameter(
        None, ARCHITECTURE, "expert FFN width (default: intermediate_size)"
    )
    capacity_factor: float | int | None = hyperparameter(
        None, ROUTER_TRAINING, "expert capacity factor (default: dropless)"
    )
    router_type: str = hyperparameter("softmax_topk", ARCHITECTURE, choices=ROUTER_TYPES)
    expert_choice_scope: str = hyperparameter(
        "sequence",
        ROUTER_TRAINING,
        "expert_choice router: experts pick tokens within each sequence or within the whole batch",
        choices=EXPERT_CHOICE_SCOPES,
    )
    norm_topk_prob: bool = hyperparameter(False, ARCHITECTURE, "renormalise the top-k gate weights")
    router_jitter_noise: float | int = hyperparameter(0.0, ROUTER_TRAINING)
    router_aux_loss_coef: float | int = hyperparameter(SWITCH_AUX_LOSS_COEF, ROUTER_TRAINING)
    router_z_loss_coef: float | int = hyperparameter(ST_MOE_Z_LOSS_COEF, ROUTER_TRAINING)
    output_router_logits: bool = False
    moe_implementation: str = hyperparameter("auto", ROUTER_TRAINING, choices=MOE_IMPLEMENTATIONS)
    model_size: str | None = None
    classifier_head: str = "hf"

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_experts == 1:
            self.top_k = 1
        if self.moe_layers is not None:
            self.moe_layers = list(self.moe_layers)
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        if self.router_type == "expert_choice" and self.capacity_factor is None:
            self.capacity_factor = EXPERT_CHOICE_CAPACITY_FACTOR
        self._validate_moe()
        super().__post_init__(**kwargs)

    def _validate_moe(self) -> None:
        if self.classifier_head not in CLASSIFIER_HEADS:
            raise ValueError(
                f"classifier_head must be one of {CLASSIFIER_HEADS}, got {self.classifier_head!r}"
            )
        check_moe_settings(
            {f.name: getattr(self, f.name) for f in hyperparameter_fields()}, self.num_hidden_layers
        )

    @property
    def moe_layer_indices(self) -> list[int]:
        """Encoder layers whose feed-forward block is an MoE block (empty for the dense model)."""
        if self.num_experts == 1:
            return []
        if self.moe_layers is not None:
            return sorted(set(self.moe_layers))
        freq = self.moe_layer_frequency
        return [i for i in range(self.num_hidden_layers) if i % freq == freq - 1]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ElectraMoEConfig:
        """Build a config from an ELECTRA paper size (`tiny`, `small`, `base`, `large`) plus overrides."""
        if name not in PRESETS:
            raise ValueError(f"model size must be one of {sorted(PRESETS)}, got {name!r}")
        kwargs: dict[str, Any] = dict(
            PRESETS[name], model_size=name, max_position_embeddings=MAX_POSITION_EMBEDDINGS
        )
        kwargs.update(overrides)
        return cls(**kwargs)


# --- Derived from the declaration ------------------------------------------------------------------------------


def hyperparameter_fields(kind: str | None = None) -> tuple[Field, ...]:
    """The fields declared with `hyperparameter(...)` (of one kind, if given), in declaration order."""
    return tuple(
        f for f in fields(ElectraMoEConfig) if "kind" in f.metadata and kind in (None, f.metadata["kind"])
    )


def check_moe_settings(values: dict[str, Any], num_hidden_layers: int | None = None) -> None:
    """ElectraMoEConfig's checks of its MoE hyperparameters (a ValueError names the first bad one). The config
    runs them on itself; the converter and run_study run them on flag values before anything is read or built.
    `values` maps declared names to values (missing names take their declared defaults)."""
    v = {f.name: f.default for f in hyperparameter_fields()} | values
    if not isinstance(v["num_experts"], int) or isinstance(v["num_experts"], bool) or v["num_experts"] < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {v['num_experts']!r}")
    top_k = 1 if v["num_experts"] == 1 else v["top_k"]
    if not isinstance(top_k, int) or not 1 <= top_k <= v["num_experts"]:
        raise ValueError(f"top_k must be between 1 and num_experts={v['num_experts']}, got {top_k!r}")
    for name, allowed in (("router_type", ROUTER_TYPES), ("expert_choice_scope", EXPERT_CHOICE_SCOPES),
                          ("moe_implementation", MOE_IMPLEMENTATIONS)):  # fmt: skip
        if v[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {v[name]!r}")
    if v["capacity_factor"] is not None and not v["capacity_factor"] > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {v['capacity_factor']!r}")
    if not isinstance(v["moe_layer_frequency"], int) or v["moe_layer_frequency"] < 1:
        raise ValueError(f"moe_layer_frequency must be an integer >= 1, got {v['moe_layer_frequency']!r}")
    if v["expert_intermediate_size"] is not None and v["expert_intermediate_size"] < 1:
        raise ValueError(f"expert_intermediate_size must be >= 1, got {v['expert_intermediate_size']!r}")
    if v["router_jitter_noise"] < 0:
        raise ValueError(f"router_jitter_noise must be >= 0, got {v['router_jitter_noise']!r}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        if v[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {v[name]!r}")
    if v["moe_layers"] is not None and num_hidden_layers is not None:
        bad = [i for i in v["moe_layers"] if not 0 <= i < num_hidden_layers]
        if bad:
            raise ValueError(
                f"moe_layers indices must lie in [0, {num_hidden_layers - 1}] "
                f"(num_hidden_layers={num_hidden_layers}), got {bad}"
            )


SIZE_FIELDS = tuple(PRESETS["small"])  # the ElectraConfig fields a preset sets; each flag overrides it
MOE_FIELDS = tuple(f.name for f in hyperparameter_fields())
# With --init_discriminator_from these come from the checkpoint's config (a flag would contradict it) ...
ARCHITECTURE_FIELDS = (*SIZE_FIELDS, *(f.name for f in hyperparameter_fields(ARCHITECTURE)))
# ... while these come from the flags, as in a fresh run.
ROUTER_TRAINING_FIELDS = tuple(f.name for f in hyperparameter_fields(ROUTER_TRAINING))
CHANGEABLE_ON_RESUME_FIELDS = frozenset(
    f.name for f in hyperparameter_fields() if f.metadata["changeable_on_resume"]
)
# A field's annotation -> the flag's type (a list is `nargs="+"`, a bool `store_true`).
FLAG_TYPES = {"int": int, "int | None": int, "list[int] | None": int, "str": str}
FLAG_TYPES |= {"float | int": float, "float | int | None": float}


def add_hyperparameter_flags(group: Any, names: tuple[str, ...], help: dict[str, str] | None = None) -> None:
    """Add `--<name>` to an argparse parser or group for each size field or MoE hyperparameter in `names`,
    with the declared default, type, choices and help (`help` replaces a flag's help text)."""
    declared = {f.name: f for f in hyperparameter_fields()}
    for name in names:
        if name in SIZE_FIELDS:
            group.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
            continue
        spec = declared[name]
        kwargs: dict[str, Any] = dict(help=(help or {}).get(name, spec.metadata["help"]))
        if spec.type == "bool":
            assert spec.default is False, f"{name}: a store_true flag needs the default False"
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=FLAG_TYPES[spec.type], default=spec.default)
        if spec.type.startswith("list["):
            kwargs["nargs"] = "+"
        if spec.metadata["choices"]:
            kwargs["choices"] = spec.metadata["choices"]
        group.add_argument(f"--{name}", **kwargs)


def config_kwargs(config: Any, also_drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config's fields as keyword arguments for another config: without what `to_dict` records about the
    saved file (model type, transformers version, architectures) and the keys in `also_drop`."""
    kwargs = copy.deepcopy(config.to_dict())
    for key in ("model_type", "transformers_version", "architectures", *also_drop):
        kwargs.pop(key, None)
    return kwargs


def make_generator_config(
    disc_config: ElectraMoEConfig, generator_size: float | None = None, generator_moe: bool = False
) -> ElectraMoEConfig:
    """Derive the ELECTRA generator config: same depth, embeddings and vocabulary, narrower layers.

    Hidden size, attention heads and intermediate size are scaled by `generator_size` (default 1/4 for
    small, 1/3 for base, as in the paper). The generator is dense unless `generator_moe` is set.
    """
    if generator_size is None:
        generator_size = GENERATOR_SIZE_BY_PRESET.get(disc_config.model_size, 1 / 4)
    if not 0 < generator_size <= 1:
        raise ValueError(f"generator_size must be in (0, 1], got {generator_size!r}")
    kwargs = config_kwargs(disc_config, also_drop=("problem_type", "id2label", "label2id"))
    heads = max(1, round(disc_config.num_attention_heads * generator_size))
    hidden = max(heads, round(disc_config.hidden_size * generator_size))
    hidden -= hidden % heads
    kwargs.update(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=max(1, round(disc_config.intermediate_size * generator_size)),
        expert_intermediate_size=max(1, round(disc_config.expert_intermediate_size * generator_size)),
    )
    if not generator_moe:
        kwargs.update(num_experts=1, top_k=1, moe_layers=None)
    return ElectraMoEConfig(**kwargs)
