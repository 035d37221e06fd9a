"""What the study computes per trait (`TraitResult`, built by `pipeline.run_trait`) and its parts, and what metrics.json
keeps of it per trait (`TraitMetrics`). The parts are plain dicts with declared keys, so that metrics.json writes
them as they are while every reader can see which keys exist. Arrays over layers have n_layers entries; arrays over
system prompts follow the order of `monitoring.graded_prompts` (or `holdout_prompts` for the held-out ones)."""
from typing import NotRequired, TypedDict

import numpy as np

from psm_jax.persona.measures import Validity
from psm_jax.persona.stats import Interval, NullBand
from psm_jax.persona.steering import ContrastPairs


# ---- shared layouts of psm_jax.persona's statistics ----

class WithinR(TypedDict):
    """`stats.within_groups_r`: r over all prompts, and r once each polarity's means are removed."""

    overall: Interval
    pooled_within: Interval
    per_group: dict[str, float | None]  # polarity -> r inside it (None with < 3 prompts or no spread)


class SplitHalf(TypedDict):
    """`stats.within_groups_reliability`: how reproducible the per-prompt means are within polarity."""

    half: float  # mean r of two halves
    reliability: float  # stepped up to the full size (Spearman-Brown)
    low: float  # 2.5% over splits
    high: float  # 97.5% over splits
    n_rows: int
    n_units: int
    n_splits: int


class WithinReliability(TypedDict):
    """`monitoring.within_reliability`: the noise ceiling on a within-polarity r."""

    measure: SplitHalf  # the measure's per-prompt means, split over units
    projection: SplitHalf  # the projection's per-prompt means, split over questions
    ceiling: float  # the within-polarity r a perfect monitor would be expected to show


class Monotonic(TypedDict):
    """`stats.monotonic` of a steering curve, plus the random-band criteria `steer_with_measure` adds."""

    increasing: bool  # strictly, over the whole sweep
    decreasing: bool
    coefs: list[float]  # sorted
    strict: bool  # increasing or decreasing
    fluent: bool  # every point within the perplexity ceiling
    strict_fluent: bool
    n_within_ceiling: int
    strict_within_ceiling: bool
    increasing_within_ceiling: bool  # the headline: strictly over >= 3 fluent points of both signs
    neg: bool  # strictly increasing over c <= 0
    pos: bool  # strictly increasing over c >= 0
    run_coefs: list[float]  # the longest increasing run spanning both signs ([] when none)
    run: bool  # the lenient criterion
    outside_band: bool  # the vector's effect above the random band
    increasing_within_ceiling_outside_band: bool


class RandomControl(TypedDict):
    """`steering.random_band` or `skipped_band`: random unit directions steered at the vector's norm at +-cmax."""

    n: int  # directions (0 when skipped)
    effects: list[float]  # per direction m(+cmax) - m(-cmax)
    ends: list[list[float]]  # per direction [m(-cmax), m(+cmax)]
    band: NullBand | None  # None when skipped or with fewer than MIN_NULL_DRAWS directions
    measure: np.ndarray | None  # [m(-cmax), m(+cmax)] averaged over directions; None when skipped
    coefs: list[float]  # [-cmax, cmax]
    skipped: NotRequired[str]  # why no direction was steered
    vector_effect: float  # the persona vector's own m(+cmax) - m(-cmax), for comparison with the band


class LayerSweep(TypedDict):
    """`steering.select_layer` on a measure's selection half."""

    layers: list[int]
    m_minus: np.ndarray  # m(-select_coef) per layer
    m_plus: np.ndarray  # m(+select_coef) per layer
    effect: np.ndarray  # m_plus - m_minus per layer
    chosen_layer: int  # argmax of effect
    select_coef: float
    n_units: int
    n_pairs: NotRequired[int]  # the response measure's selection pairs (its sweep only)


# ---- step 4: steering ----

class SteeringCurve(TypedDict):
    """One measure's steering at the layer its selection half chose, on its held-out half."""

    layer: int
    coefs: list[float]  # sorted
    measure: np.ndarray  # the mean measure per coefficient
    n_units: int  # held-out units
    ppl_ratio: np.ndarray  # perplexity of the model's own answers steered / unsteered, per coefficient
    monotonic: Monotonic
    random_control: RandomControl
    validity: Validity | None  # None when no unit was scored under both polarities
    unit_norm: float  # the steering unit at `layer` (|v| or the typical residual norm, per coef_unit)
    coef_unit: str  # "vector" | "residual"
    raw_vector_norm_in_units: float  # |v[layer]| / unit_norm


class MeasureSteering(SteeringCurve):
    """`steering.steer_with_measure`'s result: the curve and the sweep that chose its layer."""

    layer_sweep: LayerSweep


class ItemsSteering(SteeringCurve):
    """`TraitResult["steering"]`: the two-choice items' curve; their layer sweep sits at `TraitResult["layer_sweep"]`,
    where the report and metrics.json read it."""

    raw_vector_over_typical_norm: float  # |v[layer]| / the typical residual norm there


class SteeredExample(TypedDict):
    """`steering.steered_examples`: one greedy answer steered at the items' layer."""

    coef: float
    question: str
    response: str
    trait_score: NotRequired[float]  # judge-free score; absent for an empty answer


# ---- step 5 and 6b: monitoring ----

class MonitorSystem(TypedDict):
    """One graded system prompt as the items' monitoring lists it."""

    kind: str  # "pos" | "neg" | "default"
    index: int  # its instruction pair (-1: none)
    system: str | None  # None: the chat template's default
    level: int  # stated trait level, -3..3


class LayerSeparation(TypedDict):
    """`monitoring.separation_by_layer`: Cohen's d of the pos vs neg prompts' projections, per layer."""

    last_prompt: np.ndarray
    response: np.ndarray


class GradedMonitoring(TypedDict):
    """`monitoring.graded_monitoring` (step 5): the items' measure vs the projections across the graded prompts."""

    layer: int  # the items' steering layer
    systems: list[MonitorSystem]
    behaviour: np.ndarray  # the items' measure per prompt
    proj_last_prompt: np.ndarray  # per prompt, mean over the monitoring questions
    proj_response: np.ndarray
    r_last_prompt: float
    r_response: float
    n_questions: int
    system_prompt_effect: float  # mean measure under the positive minus the negative prompts
    separation_by_layer: LayerSeparation


class MonitorResponse(TypedDict):
    """One greedy answer to a monitoring question under a graded system prompt (responses.jsonl)."""

    system_kind: str
    pair: int
    question: str
    response: str


class WithinPolarity(TypedDict):
    """The within-polarity part of any monitoring result; None where fewer than 3 prompts were measured."""

    monitor_within_polarity: WithinR | None
    monitor_within_null: NullBand | None  # r with the measure shuffled within polarity
    within_reliability: WithinReliability | None


class MonitorStatistics(WithinPolarity):
    """`psm_jax.persona.monitoring.monitor_at_layer`: the response measure vs the projections at one layer."""

    system_measure: np.ndarray  # the measure's mean per prompt over held-out units
    system_prompt_effect: float
    r_last_prompt: float
    r_response: float
    proj_last_prompt: np.ndarray
    proj_response: np.ndarray


class LayerMonitoring(WithinPolarity):
    """Monitoring at one fixed layer, its statistics as `monitor_at_layer` computes them."""

    layer: int
    r_last_prompt: float
    proj_last_prompt: np.ndarray


class RuleMonitoring(LayerMonitoring):
    """`monitoring.rule_monitoring`: at the layer the extraction data fix (`rule_layer`)."""

    separation: np.ndarray  # the cross-fitted separation per layer that fixed it
    r_response: float


class HoldoutSystem(TypedDict):
    """One held-out graded system prompt (`monitoring.holdout_prompts`)."""

    kind: str
    level: int
    system: str | None


class HoldoutMonitoring(TypedDict):
    """`monitoring.holdout_monitoring`: the blind test on the trait's held-out graded prompts."""

    systems: list[HoldoutSystem]
    system_measure: np.ndarray
    n_questions: int
    level_check: WithinR  # the prompts' stated level vs the measure: do they grade it?
    within_r_by_layer: np.ndarray | None
    steering: LayerMonitoring  # at the response measure's steering layer
    rule: NotRequired[LayerMonitoring]  # at the extraction-data layer; absent when the rule fixes none


class ReferenceAnswer(TypedDict):
    """`behaviour.reference_units`: one (question, instruction pair) slot with its greedy pos and neg answers."""

    question_index: int
    question: str
    pair: int
    pos: str
    neg: str
    n_pos_tokens: int
    n_neg_tokens: int
    kept: bool  # both answers non-empty
    half: str  # "selection" (even question index) | "held-out"


class ResponseMeasure(MeasureSteering, MonitorStatistics):
    """The response-likelihood measure (step 6b) as metrics.json's `response_measure` holds it: its steering, its
    monitoring at the steering layer, at the rule's layer and on the held-out prompts, and its sizes."""

    within_r_by_layer: np.ndarray | None  # descriptive, never the layer choice
    rule_monitoring: RuleMonitoring | None  # None when the rule fixes no layer
    holdout_monitoring: NotRequired[HoldoutMonitoring | None]  # with holdout_monitoring; None: no held-out prompts
    n_selection: int
    n_held_out: int
    n_dropped: int  # slots with an empty answer
    n_questions: int
    n_pairs_per_question: int
    system_n_used: list[int]  # per graded prompt, the held-out units it scored


class ResponseBlock(ResponseMeasure):
    """`TraitResult["response"]` (`pipeline._response_block`): the measure and its reference answers."""

    reference: list[ReferenceAnswer]


# ---- steps 1-3 and 7: extraction ----

class FilterInfo(TypedDict):
    """`extraction.filter_pairs`: which pos/neg pairs built the vectors."""

    n_pairs_total: int
    filter: bool  # the filter ran (a judge that passed its validity check)
    judge_not_valid: bool  # a judge ran but failed its check, so all pairs were used
    n_pairs_kept: int
    fallback: bool  # fewer than min_kept_pairs kept, so all pairs were used


class JudgePolarity(TypedDict):
    """The judge's scores of one polarity's extraction responses."""

    trait_mean: float | None
    coherence_mean: float | None
    trait_none: int  # responses the judge gave no number for
    coherence_judged: int
    n: int


class JudgeSummary(TypedDict, total=False):
    """`extraction.judge_rows`' summary: empty without a judge."""

    pos: JudgePolarity
    neg: JudgePolarity
    validity: Validity  # the judge's trait score, pos minus neg answers, per extraction question


class ExtractionRow(TypedDict):
    """One sampled extraction conversation (`prompts.extraction_rows` with its response)."""

    polarity: str  # "pos" | "neg"
    pair: int
    question: int
    sample: int
    question_text: str
    messages: list[dict]
    response: str
    trait_score: NotRequired[float | None]  # with a judge
    coherence: NotRequired[float | None]  # with a judge; None where not judged


class VectorReliability(TypedDict):
    """`directions.split_half_cosine` of the response-average vector over extraction questions, per layer."""

    half: np.ndarray
    predicted: np.ndarray  # stepped up: the expected cosine with a rerun
    low: np.ndarray
    high: np.ndarray
    n_groups: int
    n_splits: int
    distinct_splits: int


class ScreeningSide(TypedDict):
    """One polarity's projection differences."""

    mean: float
    std: float
    n: int


class Screening(TypedDict):
    """`extraction.screening` (step 7): projection of the given responses minus the model's own answers."""

    pos: ScreeningSide
    neg: ScreeningSide


class HeldOutPairs(TypedDict):
    """Each measure's held-out units (keyed by measure name), which the specificity matrix measures."""

    items: ContrastPairs
    response_likelihood: NotRequired[ContrastPairs]  # with response_measure


# ---- the whole ----

class TraitResult(TypedDict):
    """Everything `run_trait` computes for one trait."""

    trait: str
    filter: FilterInfo
    judge: JudgeSummary
    vector_norm: dict[str, np.ndarray]  # variant -> |v| per layer
    typical_norm: np.ndarray  # per layer
    layer_sweep: LayerSweep  # the items'
    steering: ItemsSteering
    steered_examples: list[SteeredExample]
    monitoring: GradedMonitoring
    monitor_responses: list[MonitorResponse]
    response: NotRequired[ResponseBlock]  # with response_measure
    screening: NotRequired[Screening]  # with screening
    vectors: dict[str, np.ndarray]  # variant -> [n_layers, d_model]
    rows: list[ExtractionRow]
    own_responses: list[tuple[str, str]]  # (extraction question, the model's greedy answer)
    scales: np.ndarray  # the steering unit per layer
    random_units: np.ndarray  # [n_random, d_model] unit directions of the random controls
    held_out_pairs: HeldOutPairs
    reliability: VectorReliability | None
    seconds: float


class TraitMetrics(TypedDict):
    """`summary._trait_metrics`: what metrics.json's traits[name] keeps of a `TraitResult`."""

    chosen_layer: int
    coefs: list[float]
    measure: np.ndarray
    monotonic: Monotonic
    ppl_ratio: np.ndarray
    validity: Validity | None
    random_control: RandomControl
    unit_norm: float
    raw_vector_norm_in_units: float
    layer_sweep: LayerSweep
    monitor_r_last_prompt: float
    monitor_r_response: float
    monitor_behaviour: np.ndarray
    monitor_proj_last_prompt: np.ndarray
    monitor_proj_response: np.ndarray
    system_prompt_effect: float
    separation_by_layer: LayerSeparation
    filter: FilterInfo
    judge: JudgeSummary
    screening: Screening | None
    seconds: float
    response_measure: NotRequired[ResponseMeasure]
