# replearn: pretrain -> features -> L2-SVM -> tables, chained through real files.
# Drive it with these four variables (other tools rely on exactly these names):
PRESET        ?= paper
PRETRAIN_DATA ?= hf:benjamin-paine/imagenet-1k-32x32:train
CIFAR_TRAIN   ?= hf:uoft-cs/cifar10:train
CIFAR_TEST    ?= hf:uoft-cs/cifar10:test
# GAN families to pretrain and tabulate (see README): the two papers' models, plus at smoke scale
# one row per other family the issues name (weight clipping, SN-ResNet with WGAN-GP, self-attention);
# KMEANS=1 adds the reproduced Coates baseline rows (KMEANS=0 leaves them out)
ifeq ($(PRESET),smoke)
MODELS        ?= dcgan wgan-gp wgan wgan-gp-sn-resnet sagan
else
MODELS        ?= dcgan wgan-gp
endif
KMEANS        ?= 1

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Artifacts live in folders named by what produced them, so changing a split rebuilds only what is stale.
hash    = $(shell printf '%s' '$(1)' | md5sum | cut -c1-8)
RUNS    := runs/$(PRESET)-$(call hash,$(PRETRAIN_DATA))
EVALKEY := $(call hash,$(CIFAR_TRAIN)|$(CIFAR_TEST))
KMDIR   := runs/$(PRESET)-kmeans-$(EVALKEY)

CKPTS    := $(foreach m,$(MODELS),$(RUNS)/$(m)/finished.json)
FEATURES := $(foreach m,$(MODELS),$(RUNS)/$(m)/features-$(EVALKEY).h5)
RESULTS  := $(FEATURES:.h5=.svm.json) $(if $(filter 1,$(KMEANS)),$(KMDIR)/features.svm.json)
comma := ,
empty :=
space := $(empty) $(empty)

.PHONY: all setup pretrain features svm svm-table kmeans test bench clean-runs
.SECONDARY:
.DELETE_ON_ERROR:

all: svm-table

setup: $(STAMP)
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

pretrain: $(CKPTS)
features: $(FEATURES)
svm: $(RESULTS)
kmeans: $(KMDIR)/features.svm.json
svm-table: tables/cifar10.md

$(RUNS)/%/finished.json: | $(STAMP)
	$(PY) -m replearn pretrain model=$* preset=$(PRESET) data='$(PRETRAIN_DATA)' run_dir=$(RUNS)/$*

$(RUNS)/%/features-$(EVALKEY).h5: $(RUNS)/%/finished.json
	$(PY) -m replearn features run=$(RUNS)/$* preset=$(PRESET) train='$(CIFAR_TRAIN)' test='$(CIFAR_TEST)' out=$@

%.svm.json: %.h5
	$(PY) -m replearn svm features=$< out=$@ preset=$(PRESET) $(SVM_ARGS)

# Coates: features standardised in the file by the kmeans stage; his C (0.5||w||^2 + 100 * mean hinge^2)
$(KMDIR)/features.h5: | $(STAMP)
	$(PY) -m replearn kmeans preset=$(PRESET) train='$(CIFAR_TRAIN)' test='$(CIFAR_TEST)' out=$@
$(KMDIR)/features.svm.json: $(KMDIR)/features.h5
	$(PY) -m replearn svm features=$< out=$@ preset=$(PRESET) fixed_c=100 c_form=mean

tables/cifar10.md: $(RESULTS)
	$(PY) -m replearn table results='$(subst $(space),$(comma),$(strip $(RESULTS)))'

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in prepare train features svm kmeans; do $(PY) benchmarks/$$b.py || exit 1; done

clean-runs:
	rm -rf runs
