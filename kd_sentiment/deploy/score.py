"""The `score` step: a registered model labels a file or folder of texts through Spark.

The model runs as `mlflow.pyfunc.spark_udf` with the current environment: the same pyfunc that
`mlflow models serve` answers with (served_model.py), loaded in Spark's Python workers. Any Spark master
URL works unchanged; `local[*]` uses this machine's cores.

Every row is kept, in order. Each input file is read as one partition (never split), so a row's
place is (its file, `monotonically_increasing_id` within the partition); the rows are then spread
over `partitions_per_slot` x the task slots for the model, and gathered back in that order for a
single Parquet file. A row whose text is missing, null or not a string is either refused before
any scoring (the first one named by file, row and column) or, with `--bad_rows flag`, written with
its `error` and no prediction. The output's row count is checked against the input's before the
output appears.

One runtime thread per task slot: the model reads $KD_SENTIMENT_ORT_THREADS when it loads
(served_model.py), and the UDF's environment sets it to `spark.task.cpus`; Spark already runs one task
per slot, so the cores are not oversubscribed.

A failed or interrupted job leaves nothing at `--output`: Spark writes beside it, to a
`<name>.partial-<id>` folder, which is renamed to `--output` only once complete and removed on
failure (a job killed outright leaves it behind; the next job for the same output removes it).
"""
from __future__ import annotations

import logging
import sys
import time
import uuid
import warnings
from dataclasses import asdict
from pathlib import Path

import mlflow

from kd_sentiment.core import tracking
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.parameters import ScoreArgs
from kd_sentiment.deploy.served_model import THREADS_ENV

log = logging.getLogger(__name__)

READERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # file suffix -> format
FILE, ROW, ERROR = "_kd_file", "_kd_row", "error"  # a row's file and place in it; why it got no prediction
PREDICTION = "_kd_prediction"
# In the name of the folder an unfinished job writes: visible, as Spark skips reading names starting with . or _
PARTIAL = ".partial-"


# ----------------------------------------------------------------------------- reading the input

def input_format(path: str) -> str:
    """Spark's reader for `path` (a file, a folder of files of one kind, or a URI or glob ending in a
    suffix), or a UserError saying what was found."""
    if "://" in path or any(c in path for c in "*?["):
        kind = READERS.get(Path(path).suffix.lower())
        if kind is None:
            raise UserError(f"input {path}: name files ending in .csv, .jsonl or .parquet (a glob such as "
                            f"{path.rstrip('/')}/*.parquet reads a folder).")
        return kind
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"input {path}: no such file or folder.")
    files = [folder] if folder.is_file() else sorted(f for f in folder.iterdir()
                                                      if f.is_file() and not f.name.startswith((".", "_")))
    kinds = {READERS.get(f.suffix.lower()) for f in files}
    if not files or None in kinds or len(kinds) > 1:
        found = sorted({f.suffix or f.name for f in files}) or "nothing"
        raise UserError(f"input {path}: expected .csv, .jsonl or .parquet files of one kind; found {found}.")
    return kinds.pop()


def read_input(spark, path: str, kind: str, text_column: str):
    """The input's rows with FILE, ROW and ERROR (null for a row with a text) columns."""
    from pyspark.sql import functions as F

    # A file is one partition, so `monotonically_increasing_id` numbers its rows in order.
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(1 << 50))
    if kind == "json":
        return read_json_lines(spark, path, text_column)
    if kind == "csv":  # RFC 4180, as pandas and spreadsheets write it: quoted fields may hold newlines
        frame = spark.read.options(header=True, multiLine=True, escape='"', mode="FAILFAST").csv(path)
    else:
        frame = spark.read.parquet(path)
    frame = frame.withColumn(FILE, F.input_file_name()).withColumn(ROW, F.monotonically_increasing_id())
    require_column(frame.columns, text_column, path)
    text_type = frame.schema[text_column].dataType.simpleString()
    if text_type != "string":
        return frame.withColumn(ERROR, F.lit(f"not text ({text_type})"))
    return frame.withColumn(ERROR, F.when(F.col(text_column).isNull(), F.lit("missing (null)")))


def read_json_lines(spark, path: str, text_column: str):
    """JSON Lines, one object per line (blank lines skipped): each line's own JSON type of the text
    (Spark's schema would read a 5 among strings as the text "5")."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    schema = spark.read.json(path).schema
    require_column(schema.fieldNames(), text_column, path)
    schema = schema.__class__([f if f.name != text_column else f.__class__(f.name, StringType(), True)
                               for f in schema.fields if f.name != "_corrupt_record"])
    key = text_column.replace("'", "\\'")
    lines = (spark.read.text(path).withColumn(FILE, F.input_file_name())
             .withColumn(ROW, F.monotonically_increasing_id()).filter(F.trim("value") != ""))
    parsed = F.expr("try_parse_json(value)")
    kind = F.expr(f"schema_of_variant(try_variant_get(try_parse_json(value), '$[\\'{key}\\']', 'variant'))")
    error = (F.when(parsed.isNull() | ~F.expr("schema_of_variant(try_parse_json(value))").startswith("OBJECT"),
                    F.lit("not a JSON object"))
             .when(kind.isNull(), F.lit("missing (no such key)"))
             .when(kind == "VOID", F.lit("missing (null)"))
             .when(kind != "STRING", F.concat(F.lit("not text ("), F.lower(kind), F.lit(")"))))
    return lines.select(F.from_json("value", schema).alias("_kd_json"), FILE, ROW, error.alias(ERROR)) \
        .select("_kd_json.*", FILE, ROW, ERROR)


def require_column(columns: list[str], text_column: str, path: str) -> None:
    if text_column not in columns:
        shown = [c for c in columns if c not in (FILE, ROW, "_corrupt_record")]
        raise UserError(f"input {path}: no column '{text_column}' (columns: {shown}); name the text column "
                        "with --text_column.")


def first_bad_row(frame) -> str:
    """'FILE row N column C: why' for the first row (in input order) without a text."""
    from pyspark.sql import functions as F

    bad = frame.filter(F.col(ERROR).isNotNull()).orderBy(FILE, ROW).select(FILE, ROW, ERROR).first()
    position = frame.filter((F.col(FILE) == bad[FILE]) & (F.col(ROW) <= bad[ROW])).count()
    return f"{bad[FILE].removeprefix('file://')} row {position}: {bad[ERROR]}"


# ----------------------------------------------------------------------------- scoring and writing

def answer_type(model) -> tuple[list[str], str]:
    """The columns of the model's answer and their Spark struct type, from its answer to one text
    (the served model's signature declares no output types: MLflow takes them from the type hints)."""
    answer = model.predict([""])
    types = {"object": "string", "str": "string", "float64": "double", "float32": "float", "int64": "bigint"}
    unknown = {c: str(t) for c, t in answer.dtypes.items() if str(t) not in types}
    if unknown:
        raise UserError(f"the model answers with columns of types Spark cannot take here: {unknown}.")
    return list(answer.columns), ", ".join(f"`{c}` {types[str(t)]}" for c, t in answer.dtypes.items())


def predictions(frame, udf, text_column: str, columns: list[str], partitions: int):
    """`frame` with the model's `columns` added (null where ERROR is set), in input order, in one partition.
    An input column with the name of an output column is kept as `<name>_input`."""
    from pyspark.sql import functions as F

    for name in columns:
        if name in frame.columns:
            frame = frame.withColumnRenamed(name, f"{name}_input")
            text_column = f"{name}_input" if text_column == name else text_column
    # A bad row still passes through the model (an empty text: pandas UDFs see every row), then loses its answer.
    text = F.when(F.col(ERROR).isNull(), F.col(text_column)).otherwise(F.lit(""))
    scored = frame.repartition(partitions).withColumn(PREDICTION, udf(text))
    answer = [F.when(F.col(ERROR).isNull(), F.col(f"{PREDICTION}.{name}")).alias(name) for name in columns]
    kept = [c for c in frame.columns if c not in (FILE, ROW, ERROR)]
    return scored.repartition(1).sortWithinPartitions(FILE, ROW).select(*kept, *answer, ERROR)


def hadoop_path(spark, path: str):
    """(Hadoop FileSystem, Path) for `path`: rename and delete work on any store Spark writes to."""
    jvm = spark.sparkContext._jvm
    target = jvm.org.apache.hadoop.fs.Path(path)
    return target.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), target


def write_atomically(spark, frame, output: str, expected_rows: int) -> None:
    """Write `frame` as Parquet beside `output`, check its row count, then rename it to `output`."""
    fs, target = hadoop_path(spark, output)
    if fs.exists(target):
        raise UserError(f"output {output} exists; remove it or choose another --output.")
    jvm = spark.sparkContext._jvm
    parent = target.getParent()
    for status in fs.listStatus(parent) if fs.exists(parent) else []:  # left by a job killed outright
        if status.getPath().getName().startswith(f"{target.getName()}{PARTIAL}"):
            fs.delete(status.getPath(), True)
    partial = jvm.org.apache.hadoop.fs.Path(parent, f"{target.getName()}{PARTIAL}{uuid.uuid4().hex[:8]}")
    try:
        frame.write.parquet(partial.toString())
        written = spark.read.parquet(partial.toString()).count()
        if written != expected_rows:
            raise RuntimeError(f"wrote {written} rows for {expected_rows} input rows; nothing was kept.")
        if not fs.rename(partial, target):
            raise RuntimeError(f"could not rename {partial.toString()} to {output}.")
    finally:
        if fs.exists(partial):
            fs.delete(partial, True)


# ----------------------------------------------------------------------------- the `score` step

def default_model(dataset: str) -> str:
    """models:/<the one INT8 model of `dataset` with alias champion>@champion, or a UserError."""
    from mlflow.tracking import MlflowClient

    suffix = f"-{dataset}-int8"
    names = [m.name for m in MlflowClient().search_registered_models(f"name LIKE '{tracking.MODEL_PREFIX}-%{suffix}'")
             if m.name.endswith(suffix) and "champion" in (m.aliases or {})]
    if len(names) != 1:
        found = f"several: {', '.join(sorted(names))}" if names else "none"
        raise UserError(f"no single INT8 champion for {dataset} ({found}); pass --model models:/NAME@ALIAS.")
    return f"models:/{names[0]}@champion"


def spark_session(master: str, batch_rows: int):
    """A session on `master` whose Python workers run this interpreter, Arrow batches of `batch_rows`."""
    from pyspark.errors import PySparkRuntimeError
    from pyspark.sql import SparkSession

    try:
        spark = (SparkSession.builder.master(master).appName("kd-sentiment score")
                 .config("spark.pyspark.python", sys.executable).config("spark.ui.showConsoleProgress", "false")
                 .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows)).getOrCreate())
    except PySparkRuntimeError as err:  # no Java, or a master that does not answer
        raise UserError(f"Spark did not start on {master} ({str(err).splitlines()[0]}); Spark 4 needs Java 17 "
                        "(e.g. apt-get install openjdk-17-jre-headless) and a reachable --spark_master.") from None
    return spark  # a session made before gets these settings too (getOrCreate applies the modifiable ones)


def in_process_rate(model, texts: list[str], batch_rows: int) -> float:
    """Texts per second of the loaded pyfunc's `predict` over `texts`, `batch_rows` at a time."""
    start = time.perf_counter()
    for begin in range(0, len(texts), batch_rows):
        model.predict(texts[begin:begin + batch_rows])
    return len(texts) / (time.perf_counter() - start)


def score(spark, args: ScoreArgs, frame, model, model_uri: str) -> dict:
    """Check, score and write `frame` (read_input's, cached); returns the counts and rates to log."""
    from pyspark.sql import functions as F

    rows = frame.count()
    bad = frame.filter(F.col(ERROR).isNotNull()).count()
    if bad and args.bad_rows == "reject":
        raise UserError(f"{bad} of {rows} rows have no text in column '{args.text_column}'; the first: "
                        f"{first_bad_row(frame)}. Fix them, or pass --bad_rows flag to write them with an "
                        "`error` column.")
    columns, result_type = answer_type(model)
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=result_type,
                                  env_manager="local", extra_env={THREADS_ENV: str(task_cpus)})
    slots = spark.sparkContext.defaultParallelism // task_cpus
    start = time.perf_counter()
    write_atomically(spark, predictions(frame, udf, args.text_column, columns, max(1, slots) * args.partitions_per_slot),
                     args.output, rows)
    seconds = time.perf_counter() - start
    return {"rows": rows, "bad_rows": bad, "scored_rows": rows - bad, "seconds": seconds,
            "texts_per_s": (rows - bad) / seconds, "task_slots": slots}


def good_texts(frame, text_column: str) -> list[str]:
    """The texts of the rows that have one, collected on the driver (for the in-process comparison)."""
    from pyspark.sql import functions as F

    return [r[0] for r in frame.filter(F.col(ERROR).isNull()).select(text_column).collect()]


def ratio_to_in_process(spark_rate: float, before: float, after: float) -> dict:
    """Spark's rate over the mean of in-process rates measured before and after it, with the range
    the two give (the machine's drift during the job)."""
    mean = (before + after) / 2
    return {"in_process_texts_per_s_before": before, "in_process_texts_per_s_after": after,
            "in_process_texts_per_s": mean, "spark_to_in_process": spark_rate / mean,
            "spark_to_in_process_low": spark_rate / max(before, after),
            "spark_to_in_process_high": spark_rate / min(before, after)}


def log_datasets(spark, args: ScoreArgs, frame) -> None:
    """Input (`frame`, read_input's) and output as the run's datasets (contexts `input` and `predictions`)."""
    with warnings.catch_warnings():  # "integer columns cannot represent missing values": the input's, as given
        warnings.simplefilter("ignore", UserWarning)
        mlflow.log_input(mlflow.data.from_spark(frame.drop(FILE, ROW, ERROR), path=args.input, name=Path(args.input).name), context="input")
        mlflow.log_input(mlflow.data.from_spark(spark.read.parquet(args.output), path=args.output,
                                                name=Path(args.output).name, predictions="label"),
                         context="predictions")


def run(args: ScoreArgs) -> dict:
    """Score `args.input` into `args.output` inside an MLflow run (FAILED on any error, nothing at
    `--output` then); logs input and output as datasets, rows, texts/s, the Spark master and
    version, and the model's URI and version."""
    try:
        import pyspark
    except ImportError:
        raise UserError("score runs on Spark, which is not installed: pip install -e '.[spark]' (and Java 17).") \
            from None

    # pyspark warns at every pandas UDF that it is not yet tested with pandas 3, which the project pins
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    args.validate()
    kind = input_format(args.input)
    tracking.configure()
    model_uri = args.model or default_model(args.dataset)
    version = tracking.resolve_version(model_uri, needed_by="Quantize and promote a model first, or pass --model.")
    tracking.use_experiment(args.dataset)
    existing = pyspark.sql.SparkSession.getActiveSession()
    spark = spark_session(args.spark_master, args.batch_rows)
    try:
        with tracking.step_run("score", f"score-{version.name}-v{version.version}"):
            tracking.log_params({**asdict(args), "model": model_uri, "model_name": version.name,
                                 "model_version": version.version, "input_format": kind,
                                 "spark_version": spark.version, "spark_master_url": spark.sparkContext.master})
            tracking.log_environment()
            model = mlflow.pyfunc.load_model(model_uri)  # here: one process, a runtime thread per core
            frame = read_input(spark, args.input, kind, args.text_column).cache()  # read (and JSON typed) once
            if args.compare_in_process:
                texts = good_texts(frame, args.text_column)
                before = in_process_rate(model, texts, args.batch_rows)
            result = score(spark, args, frame, model, model_uri)
            if args.compare_in_process:
                result.update(ratio_to_in_process(result["texts_per_s"], before,
                                                  in_process_rate(model, texts, args.batch_rows)))
            mlflow.log_metrics({k: float(v) for k, v in result.items()})
            log_datasets(spark, args, frame)
            frame.unpersist()
    finally:
        if existing is None:
            spark.stop()
    log.info("scored %d rows (%d without a text) with %s v%s: %.1f texts/s on %s; wrote %s", result["rows"],
             result["bad_rows"], version.name, version.version, result["texts_per_s"], args.spark_master, args.output)
    return result
