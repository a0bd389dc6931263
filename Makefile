# replearn: pretrain -> features (trained + untrained control) -> L2-SVM -> curve -> K-means -> table.
# Every target runs `replearn chain`, which keys each artifact on everything that determines it
# (resolved config, input artifacts, data file identity) under build/<preset>/ and reuses it only
# when the key matches, so a second run is a no-op in seconds and a changed variable rebuilds
# exactly what depends on it. The table is written last, to tables/cifar10-<preset>.md.
# `make` alone prints `make help`. Drive it with these variables (other tools rely on exactly these names):
# PRESET has no default: the scales differ by hours, and `paper` is GPU-sized and downloads ImageNet
PRESET        ?=
PRETRAIN_DATA ?= hf:benjamin-paine/imagenet-1k-32x32:train
CIFAR_TRAIN   ?= hf:uoft-cs/cifar10:train
CIFAR_TEST    ?= hf:uoft-cs/cifar10:test
# the labelled splits under data-set-neutral names; the CIFAR_ names still work (these default to them)
TRAIN_DATA    ?= $(CIFAR_TRAIN)
TEST_DATA     ?= $(CIFAR_TEST)
# GAN families to tabulate ('' = the preset's: see replearn/chain.py), K-means row, untrained
# controls, pretraining curves (1/0), and extra key=value words for each stage
MODELS        ?=
KMEANS        ?= 1
CONTROLS      ?= 1
LAYER_ROWS    ?=
CURVE         ?= 1
DATA_NOTE     ?=
PRETRAIN_ARGS ?=
FEATURES_ARGS ?=
SVM_ARGS      ?=
KMEANS_ARGS   ?=
CURVE_ARGS    ?=
BUILD_DIR     ?= build
# another evaluation data set (TRAIN_DATA / TEST_DATA then name its train and test splits): its name
# (the table becomes tables/<DATASET>-<preset>.md), image size and channels (1: grayscale), and the
# supervised reference row (1/0: the first model's critic trained with labels) with its extra words
DATASET         ?= cifar10
IMAGE_SIZE      ?= 32
CHANNELS        ?= 3
SUPERVISED      ?= 0
SUPERVISED_ARGS ?=

PYTHON ?= python3
VENV   ?= .venv
PY     ?= $(VENV)/bin/python
STAMP  ?= $(VENV)/.installed

comma := ,
empty :=
space := $(empty) $(empty)
CHAIN = $(PY) -m replearn chain preset=$(PRESET) pretrain_data='$(PRETRAIN_DATA)' train='$(TRAIN_DATA)' \
	test='$(TEST_DATA)' kmeans=$(KMEANS) controls=$(CONTROLS) $(if $(LAYER_ROWS),layer_rows=$(LAYER_ROWS)) curve=$(CURVE) build_dir='$(BUILD_DIR)' \
	$(if $(strip $(MODELS)),models=$(subst $(space),$(comma),$(strip $(MODELS)))) data_note='$(DATA_NOTE)' \
	pretrain_args='$(PRETRAIN_ARGS)' features_args='$(FEATURES_ARGS)' svm_args='$(SVM_ARGS)' \
	kmeans_args='$(KMEANS_ARGS)' curve_args='$(CURVE_ARGS)' name='$(DATASET)' image_size=$(IMAGE_SIZE) \
	channels=$(CHANNELS) supervised=$(SUPERVISED) supervised_args='$(SUPERVISED_ARGS)'

.PHONY: help all setup pretrain features svm curve svm-table kmeans test test-all bench clean-build
.DEFAULT_GOAL := help

# the targets that run a preset's chain or study
PRESET_GOALS := all pretrain features svm curve svm-table kmeans wgan-grid ablation augment
# make reads `preset=tiny` as a variable of its own that nothing uses: refuse it (and its kin) in one line
# rather than run without the value the user meant to give
LOWERCASE := preset:PRESET pretrain_data:PRETRAIN_DATA train_data:TRAIN_DATA test_data:TEST_DATA \
	cifar_train:CIFAR_TRAIN cifar_test:CIFAR_TEST models:MODELS
$(foreach pair,$(LOWERCASE),$(if $(filter command line,$(origin $(firstword $(subst :, ,$(pair))))),\
	$(error make variables are upper case: write $(lastword $(subst :, ,$(pair)))=$($(firstword $(subst :, ,$(pair)))) \
	instead of $(firstword $(subst :, ,$(pair)))=$($(firstword $(subst :, ,$(pair)))))))
ifneq ($(filter $(PRESET_GOALS),$(MAKECMDGOALS)),)
ifeq ($(strip $(PRESET)),)
$(error PRESET is not set: name the scale, e.g. make $(firstword $(filter $(PRESET_GOALS),$(MAKECMDGOALS))) PRESET=tiny ... \
	(presets: tiny, smoke, cpu, paper; `make help` describes them))
endif
endif

define HELP
replearn: GAN critic features -> linear L2-SVM -> a table. The targets that build need PRESET, e.g.

  make svm-table PRESET=tiny PRETRAIN_DATA=<unlabelled images> TRAIN_DATA=<labelled> TEST_DATA=<labelled>

targets (pretrain ... kmeans run `replearn chain` up to their stage; whatever is built is reused by key):
  pretrain     train the GANs (MODELS) on PRETRAIN_DATA; labels unused
  features     critic features of TRAIN_DATA and TEST_DATA: trained critics and untrained controls
  svm          L2-SVMs on those features: all labels, and 400 per class over random draws
  curve        score every pretraining checkpoint (the pretraining curve)
  svm-table    all of the above plus K-means -> tables/<DATASET>-<PRESET>.md (.csv, .tex)
  kmeans       the K-means baseline row alone, no GAN
  wgan-grid    the seed papers' studies: GANs trained on STUDY_DATA, probed on TRAIN_DATA and
  ablation       TEST_DATA -> tables/<study>-<PRESET>.md; STUDY_ARGS: extra key=value words;
  augment        INCEPTION_WEIGHTS: a local FID Inception file (no FID without it)
  test         the tests not marked slow (CPU only, offline)
  test-all     every test, slow ones too (those needing ../shared/data skip without it)
  bench        the benchmarks in benchmarks/
  setup        create $(VENV) and install replearn into it (the building targets do it first)
  clean-build  delete $(BUILD_DIR)/, every built artifact (tables/ stays)

presets (PRESET=, no default):
  tiny    ~4 min on 2 CPU cores: checks that the chain runs; numbers meaningless
  smoke   checks the chain at realistic sizes, under an hour; numbers show nothing
  cpu     the headline table: hours on 2 CPU cores, minutes on a GPU
  paper   GPU-sized; by default ImageNet-1k 32x32 (and CIFAR-10) from the Hugging Face Hub

variables [value now]:
  PRESET         tiny | smoke | cpu | paper [$(or $(PRESET),unset)]
  PRETRAIN_DATA  unlabelled images: a folder of JPEG/PNG files (flat or nested), a parquet file
                 or folder, hf:<id>[:split], an .h5 cache, ... [$(PRETRAIN_DATA)]
  TRAIN_DATA     labelled images the SVMs fit: class folders root/<class>/<file>, a parquet file
                 with labels, hf:<id>:train, ...; old name CIFAR_TRAIN [$(TRAIN_DATA)]
  TEST_DATA      labelled images they are scored on; old name CIFAR_TEST [$(TEST_DATA)]
                 (any data spec may end in a row slice: train.parquet[:40000], train.parquet[40000:])
  MODELS         GAN recipes, e.g. 'dcgan wgan-gp' [$(or $(MODELS),the preset's)]
  KMEANS CONTROLS LAYER_ROWS CURVE SUPERVISED   1/0: the K-means row, untrained controls,
                 layer-equalised rows (default: the preset's; cpu: none), pretraining curves, the
                 supervised reference row
  PRETRAIN_ARGS FEATURES_ARGS SVM_ARGS KMEANS_ARGS CURVE_ARGS SUPERVISED_ARGS   extra key=value
                 words for that stage (`$(PY) -m replearn <stage> --help` lists its keys)
  DATASET IMAGE_SIZE CHANNELS   another evaluation data set: table name, image size, 1 = grey
  DATA_NOTE      said in every row about the evaluation data
  BUILD_DIR      where artifacts are built [$(BUILD_DIR)]
  PY             the python that runs replearn [$(PY)]
endef

help:
	$(info $(HELP))
	@:

all: svm-table

setup: $(STAMP)
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

pretrain: | $(STAMP)
	$(CHAIN) upto=pretrain
features: | $(STAMP)
	$(CHAIN) upto=features
svm: | $(STAMP)
	$(CHAIN) upto=svm
curve: | $(STAMP)
	$(CHAIN) upto=curve
svm-table: | $(STAMP)
	$(CHAIN) upto=table
# the K-means baseline alone (and its table row): no GAN
kmeans: | $(STAMP)
	$(CHAIN) upto=table models= controls=0 curve=0 kmeans=1

# the seed papers' studies (replearn/studies/wgan_grid.py, ablation.py, augment.py), each a keyed study that writes
# tables/<study>-<preset>.md (.csv, .tex) and tables/<study>-<preset>/ (figures): GANs trained on
# STUDY_DATA (labels unused), probed and scored on TRAIN_DATA / TEST_DATA; FID only with local
# INCEPTION_WEIGHTS; STUDY_ARGS: extra key=value words (e.g. wgan-grid 'optimizers=rmsprop,adam')
STUDY_DATA        ?= $(TRAIN_DATA)
INCEPTION_WEIGHTS ?=
STUDY_ARGS        ?=
STUDY = preset=$(PRESET) train='$(TRAIN_DATA)' test='$(TEST_DATA)' build_dir='$(BUILD_DIR)' data_note='$(DATA_NOTE)'
GAN_STUDY = $(STUDY) data='$(STUDY_DATA)' inception_weights='$(INCEPTION_WEIGHTS)'

.PHONY: wgan-grid ablation augment
wgan-grid: | $(STAMP)
	$(PY) -m replearn wgan-grid $(GAN_STUDY) $(STUDY_ARGS)
ablation: | $(STAMP)
	$(PY) -m replearn ablation $(GAN_STUDY) $(STUDY_ARGS)
augment: | $(STAMP)
	$(PY) -m replearn augment $(STUDY) $(STUDY_ARGS)

# test: the quick suite; test-all: every test, the slow ones (minutes each on 2 cores) too
test: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'
test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in prepare train features svm kmeans; do $(PY) benchmarks/$$b.py || exit 1; done

clean-build:
	rm -rf $(BUILD_DIR)
