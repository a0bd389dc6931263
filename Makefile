# replearn: pretrain -> features (trained + untrained control) -> L2-SVM -> curve -> K-means -> table.
# Every target runs `replearn chain`, which keys each artifact on everything that determines it
# (resolved config, input artifacts, data file identity) under build/<preset>/ and reuses it only
# when the key matches, so a second run is a no-op in seconds and a changed variable rebuilds
# exactly what depends on it. The table is written last, to tables/cifar10-<preset>.md.
# Drive it with these variables (other tools rely on exactly these names):
PRESET        ?= paper
PRETRAIN_DATA ?= hf:benjamin-paine/imagenet-1k-32x32:train
CIFAR_TRAIN   ?= hf:uoft-cs/cifar10:train
CIFAR_TEST    ?= hf:uoft-cs/cifar10:test
# GAN families to tabulate ('' = the preset's: see replearn/chain.py), K-means row, untrained
# controls, pretraining curves (1/0), and extra key=value words for each stage
MODELS        ?=
KMEANS        ?= 1
CONTROLS      ?= 1
LAYER_ROWS    ?= 1
CURVE         ?= 1
DATA_NOTE     ?=
PRETRAIN_ARGS ?=
FEATURES_ARGS ?=
SVM_ARGS      ?=
KMEANS_ARGS   ?=
CURVE_ARGS    ?=
BUILD_DIR     ?= build
# another evaluation data set (CIFAR_TRAIN / CIFAR_TEST then name its train and test splits): its name
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
CHAIN = $(PY) -m replearn chain preset=$(PRESET) pretrain_data='$(PRETRAIN_DATA)' train='$(CIFAR_TRAIN)' \
	test='$(CIFAR_TEST)' kmeans=$(KMEANS) controls=$(CONTROLS) layer_rows=$(LAYER_ROWS) curve=$(CURVE) build_dir='$(BUILD_DIR)' \
	$(if $(strip $(MODELS)),models=$(subst $(space),$(comma),$(strip $(MODELS)))) data_note='$(DATA_NOTE)' \
	pretrain_args='$(PRETRAIN_ARGS)' features_args='$(FEATURES_ARGS)' svm_args='$(SVM_ARGS)' \
	kmeans_args='$(KMEANS_ARGS)' curve_args='$(CURVE_ARGS)' name='$(DATASET)' image_size=$(IMAGE_SIZE) \
	channels=$(CHANNELS) supervised=$(SUPERVISED) supervised_args='$(SUPERVISED_ARGS)'

.PHONY: all setup pretrain features svm curve svm-table kmeans test test-fast bench clean-build

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

# the seed papers' studies (replearn/wgan_grid.py, ablation.py, augment.py), each a keyed study that writes
# tables/<study>-<preset>.md (.csv, .tex) and tables/<study>-<preset>/ (figures): GANs trained on
# STUDY_DATA (labels unused), probed and scored on CIFAR_TRAIN / CIFAR_TEST; FID only with local
# INCEPTION_WEIGHTS; STUDY_ARGS: extra key=value words (e.g. wgan-grid 'optimizers=rmsprop,adam')
STUDY_DATA        ?= $(CIFAR_TRAIN)
INCEPTION_WEIGHTS ?=
STUDY_ARGS        ?=
STUDY = preset=$(PRESET) train='$(CIFAR_TRAIN)' test='$(CIFAR_TEST)' build_dir='$(BUILD_DIR)' data_note='$(DATA_NOTE)'
GAN_STUDY = $(STUDY) data='$(STUDY_DATA)' inception_weights='$(INCEPTION_WEIGHTS)'

.PHONY: wgan-grid ablation augment
wgan-grid: | $(STAMP)
	$(PY) -m replearn wgan-grid $(GAN_STUDY) $(STUDY_ARGS)
ablation: | $(STAMP)
	$(PY) -m replearn ablation $(GAN_STUDY) $(STUDY_ARGS)
augment: | $(STAMP)
	$(PY) -m replearn augment $(STUDY) $(STUDY_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in prepare train features svm kmeans; do $(PY) benchmarks/$$b.py || exit 1; done

clean-build:
	rm -rf $(BUILD_DIR)
