"""What the fine-tuning study computes and keeps: per trait (`TraitResult`, built by `pipeline.run_trait`) with one
`FineTuneRow` per fine-tune, what metrics.json keeps of it (`Metrics`, from `summary.summarize`), and studies 5 and 8
on the first trait (`Beyond`, from `pipeline.beyond_training`). The parts are plain dicts with declared keys, so that
metrics.json writes them as they are while every reader can see which keys exist. Per-question arrays follow the
trait's evaluation questions (`Baseline["questions"]`)."""
from typing import NamedTuple, NotRequired, TypedDict

import jax
import numpy as np

from experiments.finetune.data import Variant
from psm_jax.persona.measures import Validity
from psm_jax.persona.stats import Effect, Interval, NullBand


# ---- shared layouts of psm_jax.persona's statistics ----

class TInterval(Interval):
    """`stats.mean_t_ci`: the mean over a few expensive units (training runs) with a Student-t interval."""

    se: float  # NaN with one unit
    df: int


class JackknifeReduction(Interval):
    """`stats.reduction_jackknife_ci`: 1 - mean(treated) / mean(reference) over training runs."""

    se: NotRequired[float]  # absent with one run (the interval is the point)


class RatioOfMeans(Interval):
    """`stats.ratio_of_means_ci`: mean(num) / mean(den) over two independent sets of questions."""

    n_num: int
    n_den: int


class PerplexityRatio(TypedDict):
    """`stats.perplexity_ratio_ci`: a model's perplexity over a reference's on the held-out conversations."""

    ratio: float
    low: float
    high: float
    n: int  # conversations


class VectorReliability(TypedDict):
    """`directions.split_half_cosine` of the persona vector over its extraction questions (`vector.persona_vector`)."""

    half: float
    predicted: float  # stepped up to the full size: the cosine expected with a vector from other questions
    low: float  # 2.5% over splits
    high: float  # 97.5% over splits
    n_groups: int  # extraction questions
    n_splits: int
    distinct_splits: int


# ---- steps 1-5: one trait's fine-tunes ----

class Training(TypedDict):
    """`training.train`: one LoRA fine-tune's loss log and speed."""

    params: NotRequired[dict]  # the merged params; popped by the caller, never kept in a row or written
    loss: list[float]  # per step
    seconds: float
    tokens_per_s: float  # the steps after the first (which includes compilation); NaN with one step


class Baseline(TypedDict):
    """`evaluation.baseline`: the original model on the trait's evaluation questions, which every fine-tune is
    measured against."""

    questions: list[str]
    answers: list[str]  # greedy, default prompt
    scoring: tuple[str, str]  # the (positive, negative) system prompts that score answers
    polar: tuple[list[str], list[str]]  # greedy answers under the positive and the negative prompts
    acts: np.ndarray  # [questions, d_model] last prompt token's activation at the layer
    scores: np.ndarray  # judge-free trait score per answer
    validity: Validity  # the score on the polar answers
    trigger_scores: NotRequired[np.ndarray]  # with persona_switch: the answers to the triggered questions' scores
    ppl_nll: NotRequired[np.ndarray]  # with held-out text: summed NLL per conversation
    ppl_counts: NotRequired[np.ndarray]  # and its token count


class Shift(TypedDict):
    """`evaluation._shift_summary`: the last prompt token's projection shift on the unit persona vector."""

    per_question: np.ndarray
    ci: Interval  # of the mean over questions
    null: NullBand  # the mean shift along `n_random` random directions at the vector's norm


class Evaluation(TypedDict):
    """`evaluation.evaluate`: one fine-tuned model against the baseline."""

    shift: Shift
    score: np.ndarray  # the fine-tune's trait score per question
    score_change: Effect  # minus the original model's
    answers: list[str]
    switch: NotRequired[Effect]  # persona switch only: the trigger's effect beyond the original model's
    # the largest mix and the steered fine-tunes, with held-out text: perplexity over the original's
    ppl: NotRequired[PerplexityRatio]
    ppl_nll: NotRequired[tuple[np.ndarray, np.ndarray]]  # its summed NLL and token count per conversation


class FineTuneRow(Evaluation):
    """`pipeline.train_and_evaluate`: one fine-tune of a trait and its evaluation."""

    variant: Variant
    training: Training  # without params


class BaseAnswers(TypedDict):
    """The part of the `Baseline` a `TraitResult` keeps."""

    questions: list[str]
    answers: list[str]
    scores: np.ndarray


class ScreeningValidity(TypedDict):
    """Per polarity, the training answers' projection minus the model's own answer's, over training questions."""

    pos: Interval
    neg: Interval


class Prevention(TypedDict):
    """`summary._prevention`: a preventative or CAFT fine-tune against the plain one at the largest mix."""

    reduction_raw: Interval  # 1 - steered / plain shift
    plain_vs_control: NotRequired[Effect]  # with a control fine-tune
    steered_vs_control: NotRequired[Effect]  # with a control fine-tune
    reduction: Interval  # beyond the control where there is one, else reduction_raw
    plain_toward_trait: NotRequired[bool]  # with a control: plain_vs_control's interval lies above 0
    ppl_vs_plain: NotRequired[PerplexityRatio]  # where both were measured on held-out text
    name: str
    kind: str  # "prevent" | "caft"
    coef: float
    relative_to_control: bool
    shift_difference: Effect
    score_difference: Effect
    ppl: PerplexityRatio | None
    plain_ppl: PerplexityRatio | None
    plain_shift: Interval


class PreventionRuns(TypedDict):
    """With prevention_runs > 1: the further training runs of the plain, preventative and control fine-tunes."""

    seeds: list[int]  # every run's seed, the primary's first
    runs: list[list[Prevention]]  # per seed after the first, `summary.prevention_summaries` of that run


class TraitResult(TypedDict):
    """Everything `run_trait` computes for one trait that the summary and the report read."""

    trait: str
    layer: int  # resid_post block of the vector and the edits
    vector_norm: float
    vector_reliability: VectorReliability | None  # None with one extraction question
    screening_validity: ScreeningValidity
    validity: Validity  # the trait score's check on this model
    base: BaseAnswers
    example_training: dict[str, list[str]]  # 'pos' / 'neg' / 'own' -> [first training question, its answer]
    rows: list[FineTuneRow]  # in `data.build_variants` order
    seconds: float
    prevention_runs: NotRequired[PreventionRuns]  # with prevention_runs > 1


class Fixed(TypedDict):
    """What every training run of a trait shares: the first run's vector and layer and the baseline."""

    vector: np.ndarray
    layer: int
    base: Baseline


class KeptFineTune(TypedDict):
    """A fine-tune that studies 5 and 8 read again: its merged params, greedy answers and variant."""

    params: dict
    answers: list[str]
    variant: Variant


class Kept(Fixed):
    """`run_trait(..., keep=True)`: what studies 5 and 8 read of the first trait's fine-tunes."""

    key: jax.Array  # the trait's training key
    training_conversations: list[list[dict]]  # the plain 100% and control sets
    plain: KeptFineTune  # the 100% mix (narrow and model_diff need one)
    control: NotRequired[KeptFineTune]  # with control
    opposite: NotRequired[KeptFineTune]  # with the 0% mix


class TraitRun(NamedTuple):
    """`run_trait`'s hand-off to `run`: the result it keeps, and what later steps read without keeping it (a tuple,
    so that `run` unpacks it and the kept fine-tunes' params go once studies 5 and 8 have read them)."""

    result: TraitResult
    fixed: Fixed  # for the further prevention runs
    kept: Kept | None  # None without keep


# ---- step 6: across fine-tunes (metrics.json's "finetune") ----

class PerTraitR(TypedDict):
    """`stats.standardised_pooled_r`'s per_group entry: one trait's own r."""

    estimate: float
    n: int
    low: NotRequired[float]  # with n >= 4
    high: NotRequired[float]


class RawCorrelation(TypedDict):
    """The pooled r of unstandardised values with pairs shuffled across all fine-tunes as its null."""

    r: Interval
    null: NullBand
    n: int
    outside_null: bool


class Correlation(RawCorrelation):
    """`summary.correlation`: the headline r across fine-tunes (named by `statistic`) and the secondary ones."""

    statistic: str  # HEADLINE_STATISTIC or, where no trait has 3 fine-tunes with spread, RAW_STATISTIC
    null_kind: str
    per_trait: NotRequired[dict[str, PerTraitR]]  # with the headline statistic
    dropped_traits: NotRequired[list[str]]  # with the headline statistic: traits with < 3 fine-tunes or no spread
    unstandardised: RawCorrelation
    within_trait: NotRequired[Interval]  # with several traits: r of values centred per trait
    within_trait_null: NotRequired[NullBand]  # where within_trait is finite: pairs shuffled inside each trait
    within_trait_outside_null: NotRequired[bool]


class BeyondControl(TypedDict):
    """`summary.beyond_control`: one mix fine-tune's changes minus its trait's control fine-tune's."""

    trait: str
    name: str
    screening: float | None
    shift: Effect
    score_change: Effect


class RowSummary(TypedDict):
    """`summary.row_summary`: one fine-tune as metrics.json and the report table keep it."""

    name: str
    kind: str  # one of config.KINDS
    mix: float | None
    coef: float
    screening: float | None
    shift: Interval
    shift_null: NullBand
    score_change: Effect
    ppl: PerplexityRatio | None  # None where not measured
    final_loss: float
    train_seconds: float
    tokens_per_s: float


class RunPrevention(TypedDict):
    """One training run's entry of `PreventionOverRuns["per_run"]`."""

    seed: int
    reduction: Interval
    plain_vs_control: Effect
    steered_vs_control: Effect
    ppl_vs_plain: float | None
    meets_target: bool  # `summary.prevention_target`


class PreventionOverRuns(TypedDict):
    """`summary.prevention_over_runs`: one preventative coefficient across independent training runs."""

    name: str
    coef: float
    n_runs: int
    seeds: list[int]
    reduction: TInterval  # the mean of per-run reductions
    pooled_reduction: JackknifeReduction  # the ratio of means
    plain_vs_control: TInterval
    ppl_vs_plain_mean: float
    ppl_vs_plain_max: float
    per_run: list[RunPrevention]


class TraitMetrics(TypedDict):
    """`summary.summarize`: what metrics.json's traits[name] keeps of a `TraitResult`."""

    layer: int
    validity: Validity
    vector_norm: float
    vector_reliability: VectorReliability | None
    screening_validity: ScreeningValidity
    finetunes: list[RowSummary]
    prevention: NotRequired[list[Prevention]]  # with a mix above 0
    prevention_over_runs: NotRequired[list[PreventionOverRuns]]  # and prevention_runs > 1
    inoculation_effect: NotRequired[Effect]  # and inoculation: inoculated minus plain 100% trait score
    persona_switch_effect: NotRequired[Effect]  # with persona_switch


class Correlations(TypedDict):
    """`summary._correlations`: shift vs behaviour and screening vs shift across fine-tunes; None where not
    computed (fewer than 3 fine-tunes or no spread)."""

    shift_behaviour: Correlation | None  # the headline: beyond the control where there is one
    screening_shift: Correlation | None
    relative_to_control: bool
    n_plain_finetunes: int  # mix and control fine-tunes
    beyond_control: list[BeyondControl]  # empty without a control
    shift_behaviour_raw: Correlation | None  # on the changes from the original model
    screening_shift_raw: Correlation | None


class Metrics(Correlations):
    """`summary.summarize`: metrics.json's "finetune"."""

    traits: dict[str, TraitMetrics]


# ---- study 5: narrow vs general (`spread.narrow_vs_general`) ----

class AnswerMeasures(TypedDict):
    """`spread.measure_answers`: per question, every trait's score and the Assistant-Axis projection."""

    scores: dict[str, np.ndarray]  # trait name -> score per question
    axis: np.ndarray


# "in" is a keyword, so the layouts keyed by domain are declared in the call form
Examples = TypedDict("Examples", {"in": list[str], "out": list[str]})  # [question, answer] per domain
ModelAnswers = TypedDict("ModelAnswers", {"in": AnswerMeasures, "out": AnswerMeasures, "examples": Examples})
# per domain: each trait's name and "assistant_axis" -> the paired change from the original model
Changes = TypedDict("Changes", {"in": dict[str, Effect], "out": dict[str, Effect]})


class NarrowFit(ModelAnswers):
    """One narrow fine-tune (`spread.narrow_vs_general`'s fits) with its answers measured in and out of domain."""

    kl_weight: float
    training: Training | None  # None at KL 0 (the study's plain 100% fine-tune)


class SpreadStats(TypedDict):
    """`spread.spread`: the out-of-domain change as a fraction of the in-domain change, beyond a null model's."""

    spread: RatioOfMeans
    in_domain: Interval
    out_of_domain: Interval
    readable: bool  # the in-domain interval excludes 0


class KlRow(SpreadStats):
    """`spread.summarize_narrow`: one KL weight's narrow fine-tune."""

    kl_weight: float
    spread_vs_original: RatioOfMeans  # the spread beyond the original model instead of the control
    changes: Changes
    examples: Examples
    final_loss: float | None  # None at KL 0
    train_seconds: float | None


class AxisInfo(TypedDict):
    """`spread.assistant_axis`'s description of the axis."""

    source: str  # axis_file, or the stand-in's recipe
    n_roles: int | None


class NarrowSummary(TypedDict):
    """`spread.summarize_narrow`."""

    trait: str  # the trained (first) trait
    per_kl: list[KlRow]
    control_changes: Changes  # the null
    original_examples: Examples


class Narrow(NarrowSummary):
    """`spread.narrow_vs_general`: study 5 as metrics.json's beyond_training["narrow"] holds it."""

    axis: AxisInfo
    n_in: int
    n_out: int
    out_sources: dict[str, int]  # source -> out-of-domain questions from it


# ---- study 8: model diffing (`spread.model_diffing`) ----

class OverlapBounds(TypedDict):
    """`spread.question_intervals`' interval of the top-k overlap."""

    low: float
    high: float
    left_out_min: int  # the overlap's range with one question left out
    left_out_max: int


class OverlapInterval(OverlapBounds):
    """`OverlapBounds` with its number of questions, as `spread._compare` keeps it."""

    n: int


class Bounds(TypedDict):
    """An interval without its estimate (the estimate sits beside it)."""

    low: float
    high: float


class QuestionIntervals(TypedDict):
    """`spread.question_intervals`: leave-one-question-out jackknife intervals."""

    overlap: OverlapBounds
    r: Bounds
    n: int
    method: str


class Overlap(TypedDict):
    """`spread.overlap_stats`: top-k(a) & top-k(b) among the alive latents."""

    overlap: int
    fraction: float
    chance: float  # k^2 / S
    null: NullBand  # random k-latent sets' overlap with top-k(b)
    k: int
    n_latents: int  # alive latents, S
    above_null: bool
    top_a: list[int]
    top_b: list[int]
    interval: NotRequired[OverlapInterval]  # added by `spread._compare`


class SpearmanR(TypedDict):
    """`spread.spearman`'s r, with the interval over questions that `spread._compare` adds."""

    estimate: float
    low: NotRequired[float]
    high: NotRequired[float]
    n: NotRequired[int]


class Spearman(TypedDict):
    """`spread.spearman`: the rank correlation of two change vectors over the alive latents."""

    r: SpearmanR
    null: NullBand  # shuffled pairing
    n: int  # latents
    outside_null: bool


class Comparison(TypedDict):
    """`spread._compare`: one change vector against the system prompts'."""

    overlap: Overlap
    spearman: Spearman


class DecoderAlignment(TypedDict):
    """`spread.decoder_alignment`: the persona vector's mean |cosine| with some latents' decoder rows."""

    mean_abs_cos: float
    null: NullBand  # random sets of as many alive latents
    above_null: bool
    k: int


class TopChange(TypedDict):
    """One of the fine-tune's top latents with its mean change under the fine-tune and the system prompts."""

    latent: int
    finetune_change: float
    prompt_change: float


class DiffSummary(Comparison):
    """`spread.summarize_diff`: the plain fine-tune's comparison and the further ones."""

    decoder_alignment: DecoderAlignment  # of the fine-tune's top latents
    prompt_decoder_alignment: DecoderAlignment  # of the system prompt's top latents
    top_changes: list[TopChange]  # the fine-tune's first 10 top latents
    control_overlap: NotRequired[int]  # with control
    beyond_control: NotRequired[Comparison]  # with control
    polarity: NotRequired[Comparison]  # with the 0% mix


class SaeInfo(TypedDict):
    """`spread.feature_sae`'s description of the SAE."""

    source: str
    trained_here: bool
    d_sae: int
    format: NotRequired[str]  # loaded only
    k: NotRequired[int]  # trained here only
    tokens: NotRequired[int]
    steps: NotRequired[int]
    eval_on_training_acts: NotRequired[dict[str, float]]


class ModelDiff(DiffSummary):
    """`spread.model_diffing`: study 8 as metrics.json's beyond_training["model_diff"] holds it."""

    sae: SaeInfo
    n_documents: int
    trait: str


class Beyond(TypedDict, total=False):
    """`pipeline.beyond_training`: studies 5 and 8 on the first trait (metrics.json's "beyond_training"); empty when
    neither ran."""

    narrow: Narrow  # with narrow
    model_diff: ModelDiff  # with model_diff
    seconds: float  # whenever either ran
