"""Regenerate the bad-input corpus next to this file: `python tests/workflow/bad_inputs/make_corpus.py`.

The generated files are committed; edit a case here and rerun rather than editing the YAML by hand.
Each case is a full recipe (a valid base with one thing broken) plus `# expect:` lines (text the
error must contain) and `# arg:` lines (extra CLI arguments).
"""
import copy
import struct
import zlib
from pathlib import Path

import yaml
from PIL import Image

root = Path(__file__).parent
(root / "data").mkdir(parents=True, exist_ok=True)
(root / "refs").mkdir(exist_ok=True)

Image.new("RGB", (96, 128), (200, 120, 40)).save(root / "refs/ok.jpg", quality=70)
Image.new("RGB", (32, 32), (10, 20, 30)).save(root / "refs/tiny.png")
Image.new("RGB", (64, 600), (10, 20, 30)).save(root / "refs/thin.png")
(root / "refs/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg at all" * 4)

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 20000x20000 RGB, header only
(root / "refs/huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))

(root / "data/products.csv").write_text("sku,name,image\nA-100,white sneaker,refs/ok.jpg\nB-200,brown boot,refs/ok.jpg\n")
(root / "data/dupes.csv").write_text("sku,name,image\nA-100,white sneaker,refs/ok.jpg\nB-200,brown boot,refs/ok.jpg\nA-100,red sneaker,refs/ok.jpg\n")
(root / "data/ragged.csv").write_text("sku,name,image\nA-100,white sneaker\n")
(root / "data/escape.csv").write_text("sku,name,image\n..,sneaky,refs/ok.jpg\n")
(root / "data/bad.jsonl").write_text('{"sku": "A-100", "name": "ok"}\n{"sku": "B-200", name: broken}\n')

BASE = {
    "version": 1, "name": "corpus", "model": "runware:400@6", "seed": 1,
    "datasets": {"products": {"csv": "data/products.csv", "key": "{sku}"}, "surfaces": {"values": ["marble", "oak"]}},
    "matrix": {"product": "products", "surface": "surfaces"},
    "task": {"positivePrompt": "Photo of {product.name} on {surface}", "width": 512, "height": 512,
             "inputs": {"referenceImages": ["{product.image}"]}},
    "output": {"dir": "out/{name}", "filename": "{product.sku}_{surface}_{result}.{ext}"},
}

def case(name, expects, change=None, args=(), text=None):
    header = "".join(f"# expect: {e}\n" for e in expects) + "".join(f"# arg: {a}\n" for a in args)
    if text is None:
        data = copy.deepcopy(BASE)
        change(data)
        text = yaml.safe_dump(data, sort_keys=False, width=200)
    (root / f"{name}.yaml").write_text(header + text)

def task(**fields):
    return lambda d: d["task"].update(fields)

def refs(*paths):
    return lambda d: d["task"]["inputs"].update(referenceImages=list(paths))

case("malformed-yaml", ["malformed-yaml.yaml:7:8:", "YAML syntax error"], text="version: 1\nname: x\ntask:\n  positivePrompt: [unclosed\n  width: 512\n")
case("python-object-tag", ["python-object-tag.yaml:", "!!python/object/apply:os.system", "not allowed"], text="version: 1\nname: x\nseed: !!python/object/apply:os.system ['echo pwned']\ntask: {positivePrompt: hi}\n")
case("python-name-tag", ["YAML tag", "not allowed"], text="version: 1\nname: x\ntask:\n  positivePrompt: !!python/name:os.system\n")
case("custom-tag", ["YAML tag '!include'", "not allowed"], text="version: 1\nname: x\ntask: !include other.yaml\n")
case("duplicate-yaml-key", ["duplicate-yaml-key.yaml:8:3:", "duplicate key 'width'"], text="version: 1\nname: x\nmodel: runware:400@6\ntask:\n  width: 512\n  width: 1024\n  height: 512\n  positivePrompt: hi\n")
case("not-a-mapping", ["not-a-mapping.yaml", "must be a YAML mapping"], text="- version: 1\n- name: x\n")
case("empty-file", ["empty-file.yaml", "must be a YAML mapping"], text="")
case("unknown-top-key", ["steps: unknown field"], lambda d: d.update(steps=4))
case("unknown-task-key", ["task.stepz: unknown field", "did you mean 'steps'"], task(stepz=4))
case("unknown-dataset-key", ["datasets.products.colum: unknown field"], lambda d: d["datasets"]["products"].update(colum="x"))
case("unknown-output-key", ["output.folder: unknown field"], lambda d: d["output"].update(folder="x"))
case("width-wrong-type", ["task.width", "got 'large'"], task(width="large"))
case("width-100", ["task.width: must be a multiple of 16 between 128 and 2048, got 100"], task(width=100))
case("width-2050", ["task.width: must be a multiple of 16 between 128 and 2048, got 2050"], task(width=2050))
case("width-1000", ["task.width: must be a multiple of 16 between 128 and 2048, got 1000"], task(width=1000))
case("height-list", ["task.height", "got [512]"], task(height=[512]))
case("references-zero", ["task.inputs.referenceImages: must have 1 to 4 reference images, got 0"], refs())
case("references-five", ["task.inputs.referenceImages: must have 1 to 4 reference images, got 5"], refs(*["refs/ok.jpg"] * 5))
case("steps-0", ["task.steps: must be an integer between 1 and 50, got 0"], task(steps=0))
case("steps-51", ["task.steps: must be an integer between 1 and 50, got 51"], task(steps=51))
case("output-quality-10", ["task.outputQuality: must be an integer between 20 and 99, got 10"], task(outputQuality=10))
case("number-results-21", ["task.numberResults: must be an integer between 1 and 20, got 21"], task(numberResults=21))
case("missing-csv-column", ["task.positivePrompt: template names unknown field 'product.colour'", "row A-100 of dataset products", "available: product.sku, product.name, product.image"], task(positivePrompt="A {product.colour} shoe"))
case("unknown-template-variable", ["task.positivePrompt: template names unknown field 'prodct.name'"], task(positivePrompt="A {prodct.name}"))
case("missing-reference", ["refs/nope.jpg does not exist", "item 'product=A-100|surface=marble'"], refs("refs/nope.jpg"))
case("corrupt-reference", ["refs/corrupt.jpg is not a readable image"], refs("refs/corrupt.jpg"))
case("huge-reference", ["refs/huge.png is too large", "400,000,000 pixels"], refs("refs/huge.png"))
case("tiny-reference", ["refs/tiny.png is 32x32", "at least 64"], refs("refs/tiny.png"))
case("thin-reference", ["refs/thin.png is 64x600", "aspect ratio"], refs("refs/thin.png"))
case("reference-url", ["task.inputs.referenceImages[0]: not supported yet by the local engine"], refs("https://example.com/a.jpg"))
case("filename-dotdot", ["output.filename", "escapes the output folder"], lambda d: d["output"].update(filename="../{product.sku}_{surface}_{result}.{ext}"))
case("filename-absolute", ["output.filename", "absolute"], lambda d: d["output"].update(filename="/tmp/{product.sku}_{surface}_{result}.{ext}"))
case("dir-dotdot", ["output.dir", "escapes the output folder"], lambda d: d["output"].update(dir="../../elsewhere"))
case("filename-escape-by-data", ["output.filename: '../marble_0.jpg'", "escapes the output folder"],
     lambda d: (d["datasets"]["products"].update(csv="data/escape.csv"), d["output"].update(filename="{product.sku}/{surface}_{result}.{ext}")))
case("filename-collision", ["output.filename", "is written by both"], lambda d: d["output"].update(filename="{product.sku}_{result}.{ext}"))
case("filename-without-ext", ["output.filename: must contain {ext}"], lambda d: d["output"].update(filename="{product.sku}_{surface}_{result}.png"))
case("duplicate-dataset-keys", ["datasets.products: duplicate key 'A-100' in line 2 of data/dupes.csv and line 4 of data/dupes.csv"], lambda d: d["datasets"]["products"].update(csv="data/dupes.csv"))
case("ragged-csv", ["datasets.products.csv: line 2 of data/ragged.csv has 2 cells, the header has 3"], lambda d: d["datasets"]["products"].update(csv="data/ragged.csv"))
case("missing-csv-file", ["datasets.products.csv: file not found: data/nope.csv"], lambda d: d["datasets"]["products"].update(csv="data/nope.csv"))
case("bad-jsonl", ["datasets.products.jsonl: line 2 of data/bad.jsonl is not valid JSON"], lambda d: d["datasets"].update(products={"jsonl": "data/bad.jsonl"}))
case("dataset-two-sources", ["datasets.products: needs exactly one of csv, jsonl, images, values; got csv, values"], lambda d: d["datasets"]["products"].update(values=["a"]))
case("filter-unknown-column", ["datasets.products.filter: unknown column 'colour'"], lambda d: d["datasets"]["products"].update(filter={"colour": "red"}))
case("images-glob-empty", ["datasets.products.images: 'refs/*.tiff' matches no files"], lambda d: d["datasets"].update(products={"images": "refs/*.tiff"}))
case("matrix-wrong-type", ["matrix.surface: must be a dataset name or an inline list of values, got 5"], lambda d: d["matrix"].update(surface=5))
case("unknown-dataset-in-matrix", ["matrix.product: unknown dataset 'prodcts'; datasets: products, surfaces"], lambda d: d["matrix"].update(product="prodcts"))
case("reserved-variable", ["matrix.name: 'name' is reserved"], lambda d: d["matrix"].update(name=["a", "b"]))
case("zip-length-mismatch", ["zip[0]: variables must have the same number of rows", "product has 2, light has 3"],
     lambda d: (d["matrix"].pop("product"), d.update(zip=[{"product": "products", "light": ["soft", "hard", "rim"]}])))
case("exclude-unknown-variable", ["exclude[0].colour: not a matrix variable"], lambda d: d.update(exclude=[{"colour": "red"}]))
case("include-unknown-row", ["include[0].product: no row matches 'Z-999'"], lambda d: d.update(include=[{"product": "Z-999", "surface": "velvet"}]))
case("unknown-scheduler", ["task.scheduler: must be one of the 75 scheduler names", "did you mean 'Euler a'"], task(scheduler="Eular a"))
case("unsupported-scheduler", ["task.scheduler: not supported yet by the local engine", "use 'DPMSolverMultistepScheduler'"], task(scheduler="DPMSolverMultistepInverse"))
case("cfg-on-distilled", ["task.CFGScale: runware:400@6 (klein-9b-kv) is guidance-distilled, so CFGScale must be absent or <= 1, got 3.5"], task(CFGScale=3.5))
case("cfg-out-of-range", ["task.CFGScale: must be a number between 1 and 20 in steps of 0.01, got 25"], task(CFGScale=25))
case("upload-one-url-many-results", ["task.uploadEndpoint: numberResults is 2, so every result would be uploaded to the same URL"],
     task(uploadEndpoint="https://bucket.example.com/photo.jpg", numberResults=2))
case("upload-not-a-url", ["task.uploadEndpoint: must be an http(s) URL"], task(uploadEndpoint="ftp://example.com/x"))
case("ttl-without-url-output", ["task.ttl: applies only to outputType 'URL', not 'base64Data'"], task(ttl=120, outputType="base64Data"))
case("webhook-not-a-url", ["task.webhookURL: must be an http(s) URL, got 'not a url'"], task(webhookURL="not a url"))
case("lora-weight", ["task.lora[0].weight: must be a number between -4 and 4 in steps of 0.01, got 9"], task(lora=[{"model": "civitai:1@1", "weight": 9}]))
case("accelerator-options", ["task.acceleratorOptions.cacheMaxConsecutiveSteps: must be an integer between 1 and 5, got 9"], task(acceleratorOptions={"cacheMaxConsecutiveSteps": 9}))
case("acceleration-turbo", ["task.acceleration: must be one of none, low, medium, high, got 'turbo'"], task(acceleration="turbo"))
case("two-step-caches", ["task.acceleratorOptions: teaCache, fbCache and dbCache are alternatives; enable one of them, got teaCache, fbCache"],
     task(acceleratorOptions={"teaCache": True, "fbCache": True}))
case("ttl-30", ["task.ttl: must be an integer >= 60, got 30"], task(ttl=30))
case("task-uuid", ["task.taskUUID: must be a UUID v4"], task(taskUUID="1234"))
case("negative-prompt-short", ["task.negativePrompt: must have 2 to 3000 characters, got 1"], task(negativePrompt="x"))
case("seed-negative", ["task.seed: must be an integer between 0 and 9223372036854775807, got -1"], task(seed=-1))
case("output-format-gif", ["task.outputFormat: must be one of JPG, PNG, WEBP, got 'GIF'"], task(outputFormat="GIF"))
case("missing-prompt", ["task.positivePrompt: required"], lambda d: d["task"].pop("positivePrompt"))
case("missing-model", ["model: required"], lambda d: d.pop("model"))
case("version-2", ["version:"], lambda d: d.update(version=2))
case("bad-name", ["name:"], lambda d: d.update(name="../evil"))
case("set-without-equals", ["--set 'task.steps': expected KEY=VALUE"], lambda d: None, args=["--set", "task.steps"])
case("set-empty-segment", ["--set 'task..steps=4': bad key segment"], lambda d: None, args=["--set", "task..steps=4"])
case("set-bad-yaml", ["--set 'task.width=[1,': value is not valid YAML"], lambda d: None, args=["--set", "task.width=[1,"])
case("set-out-of-range", ["task.steps: must be an integer between 1 and 50, got 0"], lambda d: None, args=["--set", "task.steps=0"])
case("set-into-scalar", ["--set 'task.width.x=1': task.width holds 512, not a mapping"], lambda d: None, args=["--set", "task.width.x=1"])
case("many-problems", ["task.width: must be a multiple of 16", "task.steps: must be an integer between 1 and 50, got 0", "task.foo: unknown field", "output.filename: must contain {ext}"],
     lambda d: (d["task"].update(width=100, steps=0, foo=1), d["output"].update(filename="{product.sku}.png")))
# schedules, incremental datasets, the golden-seed canary
case("schedule-bad-cron", ["schedule.cron: must be a cron expression of 5 fields", "'61 3 * * *' has a value out of range"], lambda d: d.update(schedule="61 3 * * *"))
case("schedule-six-fields", ["schedule.cron: must be a cron expression of 5 fields", "has 6 fields"], lambda d: d.update(schedule="0 0 3 * * *"))
case("schedule-not-cron", ["schedule: must be a cron string such as \"0 3 * * *\" or a mapping with cron, timezone, missed; got 3"], lambda d: d.update(schedule=3))
case("schedule-timezone", ["schedule.timezone: must be an IANA time zone name such as UTC, Europe/Berlin or America/New_York, got 'Berlin'"],
     lambda d: d.update(schedule={"cron": "0 3 * * *", "timezone": "Berlin"}))
case("schedule-missed", ["schedule.missed: must be one of run, skip, got 'catch-up'"], lambda d: d.update(schedule={"cron": "@daily", "missed": "catch-up"}))
case("schedule-unknown-key", ["schedule.tz: unknown field; allowed: cron, timezone, missed"], lambda d: d.update(schedule={"cron": "@daily", "tz": "UTC"}))
case("incremental-not-bool", ["datasets.products.incremental: must be true or false, got 'yes'"], lambda d: d["datasets"]["products"].update(incremental="yes"))
case("canary-items-zero", ["canary.items: must be an integer between 1 and 16, got 0"], lambda d: d.update(canary={"items": 0}))
case("canary-threshold", ["canary.threshold_db: must be a number between 1 and 100, got 400"], lambda d: d.update(canary={"items": 2, "threshold_db": 400}))
case("canary-without-items", ["canary.items: required"], lambda d: d.update(canary={"threshold_db": 40}))
print(len(list(root.glob("*.yaml"))), "cases")
