# make demo: the main job on synthetic data (about 2-4 minutes on 2 CPU cores); make test: the tests.
# Each first installs what it needs (requirements.txt; quick when already installed).
PY ?= python3
DATA ?= data
SIZE ?= 64
RUNS ?= runs

.PHONY: install demo synth masker classifier evaluate choose test tecom300 crossdomain crossdomain-seeds \
	choose-tecom crossdomain-guide crossdomain-maskers

install:
	$(PY) -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r requirements.txt

demo: install synth masker classifier evaluate

synth:   # once: synth.py refuses a non-empty folder (its --force replaces it)
	test -d $(DATA)/WBC_100 || $(PY) synth.py $(DATA) --scale 0.1 --size 128 --seed 0

masker:
	$(PY) train_masker.py --data $(DATA) --split 100 --pretrain-on $(DATA)/CAM16 --pretrain-epochs 2 --size $(SIZE) \
		--epochs 15 --batch-size 8 --lr 2e-3 --out $(RUNS)/masker_WBC_100

classifier:   # --holdout 0.2: a fifth of the training images fits the temperature (and chose LR)
	$(PY) train_classifier.py --data $(DATA) --split 100 --alpha -1 1 --size $(SIZE) \
		--masks $(RUNS)/masker_WBC_100/masks --epochs 5 --batch-size 16 --lr $(LR) --holdout 0.2 \
		--out $(RUNS)/classifier_WBC_100_alpha-1_1

# the demo classifier's lr, chosen on its holdout (a fifth of the training images), never on val:
# the best holdout balanced accuracy sets LR above
LR ?= 3e-4
LRS ?= 3e-4 1e-3 3e-3
choose: install synth masker
	for lr in $(LRS); do printf "lr $$lr: "; $(PY) train_classifier.py --data $(DATA) --split 100 --alpha -1 1 \
		--size $(SIZE) --masks $(RUNS)/masker_WBC_100/masks --epochs 5 --batch-size 16 --lr $$lr --holdout 0.2 \
		--out $(RUNS)/choose/lr$$lr | grep "^holdout"; done

evaluate:
	$(PY) evaluate.py $(RUNS)/classifier_WBC_100_alpha-1_1/checkpoint.pt --data $(DATA) --json $(RUNS)/demo_classifier.json
	$(PY) evaluate.py $(RUNS)/masker_WBC_100/checkpoint.pt --data $(DATA) --json $(RUNS)/demo_masker.json

test: install
	$(PY) -m pytest -q

# real images, 300 of them: a smoke test of the pipeline on real BMPs and 0/128/255 masks
TECOM ?= ../shared/data/tecom300
tecom300: install
	$(PY) train_masker.py --data $(TECOM) --split 100 --size 96 --epochs 30 --batch-size 8 --out $(RUNS)/tecom_masker
	$(PY) train_classifier.py --data $(TECOM) --split 100 --size 96 --alpha -1 1 --masks $(RUNS)/tecom_masker/masks \
		--epochs 14 --batch-size 16 --lr 1e-3 --out $(RUNS)/tecom_classifier
	$(PY) evaluate.py $(RUNS)/tecom_classifier/checkpoint.pt --json $(RUNS)/tecom_classifier.json
	$(PY) evaluate.py $(RUNS)/tecom_masker/checkpoint.pt --json $(RUNS)/tecom_masker.json

# cross-domain: maskers and classifiers trained on synthetic, on tecom300, and on both, each scored on both;
# then crossdomain-guide
# (96 px; NEWSCOPE is the augmentation for a new microscope: zoom in and out, stain, blur)
XD ?= $(RUNS)/crossdomain
NEWSCOPE ?= --zoom 0.3 1.3 --stain 0.5 --blur 1
XDSIZE ?= 96
ONTECOM = --data $(TECOM) --split 100 --size $(XDSIZE) --epochs 14 --batch-size 16
SYNTH_SOURCE = train_classifier.py --data $(DATA) --split 100 --size $(XDSIZE) --epochs 5 --batch-size 16 --lr 1e-3 \
	$(NEWSCOPE)
# fine-tune from those synthetic sources (crossdomain-seeds, choose-tecom)
FROM_SYNTH = --init $(XD)/classifier_synth_aug/checkpoint.pt
FROM_SYNTH_WHITE = --white-balance --init $(XD)/classifier_synth_aug_white/checkpoint.pt
crossdomain: install
	test -d $(DATA)/WBC_100 || $(PY) synth.py $(DATA) --scale 0.1 --size 128 --seed 0
	$(PY) train_masker.py --data $(DATA) --split 100 --size $(XDSIZE) --epochs 15 --batch-size 8 --lr 2e-3 --out $(XD)/masker_synth
	$(PY) train_masker.py --data $(DATA) --split 100 --size $(XDSIZE) --epochs 15 --batch-size 8 --lr 2e-3 $(NEWSCOPE) --out $(XD)/masker_synth_aug
	$(PY) train_masker.py --data $(TECOM) --split 100 --size $(XDSIZE) --epochs 30 --batch-size 8 --out $(XD)/masker_tecom
	$(PY) train_masker.py --data $(TECOM) --split 100 --size $(XDSIZE) --epochs 30 --batch-size 8 --pretrain-on $(DATA) \
		--pretrain-epochs 15 $(NEWSCOPE) --out $(XD)/masker_synth_tecom_aug
	$(PY) train_masker.py --data $(TECOM) --split 100 --size $(XDSIZE) --epochs 15 --batch-size 8 --pretrain-on $(DATA) \
		--pretrain-epochs 15 --replay 3 $(NEWSCOPE) --out $(XD)/masker_synth_tecom_replay
	$(PY) $(SYNTH_SOURCE) --out $(XD)/classifier_synth_aug
	$(PY) train_classifier.py $(ONTECOM) --lr 1e-3 --out $(XD)/classifier_tecom
	$(PY) train_classifier.py $(ONTECOM) --lr 1e-3 $(NEWSCOPE) --init $(XD)/classifier_synth_aug/checkpoint.pt \
		--out $(XD)/classifier_synth_tecom_aug
	$(PY) train_classifier.py $(ONTECOM) --lr 3e-4 --init $(XD)/classifier_synth_aug/checkpoint.pt --out $(XD)/classifier_synth_tecom
	$(PY) $(SYNTH_SOURCE) --white-balance --out $(XD)/classifier_synth_aug_white
	$(PY) train_classifier.py $(ONTECOM) --lr 1e-3 --white-balance --out $(XD)/classifier_tecom_white
	$(PY) train_classifier.py $(ONTECOM) --lr 3e-4 --white-balance --init $(XD)/classifier_synth_aug_white/checkpoint.pt \
		--out $(XD)/classifier_synth_tecom_white
	for run in $(XD)/*/; do for target in $(DATA) $(TECOM); do \
		$(PY) evaluate.py $$run/checkpoint.pt --data $$target --json $$run/on_$$(basename $$target).json | tail -2; done; done
	$(MAKE) crossdomain-guide   # then the mask guidance across microscopes (below)

# the tecom300 classifiers above, seeds 0-4 (after make crossdomain: its synthetic sources; ~30 min): balanced
# accuracy on tecom300 val, where 4 Eosinophils and 10 Monocytes decide it, moves with the seed
SEEDS ?= 0 1 2 3 4
crossdomain-seeds: install
	for seed in $(SEEDS); do for run in "tecom" "tecom_white --white-balance" \
		"synth_tecom --lr 3e-4 $(FROM_SYNTH)" "synth_tecom_white --lr 3e-4 $(FROM_SYNTH_WHITE)"; do \
		set -- $$run; name=$$1; shift; printf "%-18s seed $$seed: " $$name; \
		$(PY) train_classifier.py $(ONTECOM) --lr 1e-3 "$$@" --seed $$seed --out $(XD)/seeds/$${name}_$$seed | tail -1; \
	done; done

# the tecom300 choices of make crossdomain (white balance; the fine-tune's lr), made again on a fifth
# of tecom300's training images (--holdout 0.2; seeds 0-2, each its own fifth), never on its val;
# trains make crossdomain's synthetic sources when they are missing (~30 min in all). The holdout rows
# of $(XD)/choose/table.md decide; its on_tecom300 rows (val, scored after all runs) are the record.
CHOICES = "tecom" "tecom_white --white-balance" \
	"synth_tecom_lr1e-4 --lr 1e-4 $(FROM_SYNTH)" \
	"synth_tecom_lr3e-4 --lr 3e-4 $(FROM_SYNTH)" \
	"synth_tecom_lr1e-3 --lr 1e-3 $(FROM_SYNTH)" \
	"synth_tecom_white_lr1e-4 --lr 1e-4 $(FROM_SYNTH_WHITE)" \
	"synth_tecom_white_lr3e-4 --lr 3e-4 $(FROM_SYNTH_WHITE)" \
	"synth_tecom_white_lr1e-3 --lr 1e-3 $(FROM_SYNTH_WHITE)"
CHOOSE_SEEDS ?= 0 1 2
choose-tecom: install
	test -d $(DATA)/WBC_100 || $(PY) synth.py $(DATA) --scale 0.1 --size 128 --seed 0
	test -f $(XD)/classifier_synth_aug/metrics.json || $(PY) $(SYNTH_SOURCE) --out $(XD)/classifier_synth_aug
	test -f $(XD)/classifier_synth_aug_white/metrics.json || $(PY) $(SYNTH_SOURCE) --white-balance \
		--out $(XD)/classifier_synth_aug_white
	for seed in $(CHOOSE_SEEDS); do for run in $(CHOICES); do \
		set -- $$run; name=$$1; shift; \
		test -f $(XD)/choose/$${name}_$$seed/metrics.json || $(PY) train_classifier.py $(ONTECOM) --lr 1e-3 \
			"$$@" --holdout 0.2 --seed $$seed --out $(XD)/choose/$${name}_$$seed | grep "^holdout"; \
	done; done
	for run in $(XD)/choose/*/; do test -f $$run/on_tecom300.json || \
		$(PY) evaluate.py $$run/checkpoint.pt --json $$run/on_tecom300.json | tail -1; done
	$(PY) sweep_table.py $(XD)/choose

# mask guidance across microscopes: synthetic (rendered at 256 px, so a crop is as sharp as a real
# cell) -> tecom300 val, and tecom300 -> synthetic val; nomask, input, crop; seeds 0-2 (~90 min on 2
# cores). At test time the source's own masker (seed 0) draws the masks (the target's are never used).
# Classifiers keep 20% of their training images out (--holdout 0.2): the temperature is fitted there.
# A rerun skips every run with a metrics.json and every score already written.
XG ?= $(RUNS)/crossdomain_guide
XM = $(XG)/maskers
DATA256 ?= data256
GUIDE_SEEDS ?= 0 1 2
crossdomain-guide: install crossdomain-maskers
	for seed in $(GUIDE_SEEDS); do for mode in nomask input crop; do \
		guide=$$(test $$mode = nomask || echo --mask-mode $$mode); \
		test -f $(XG)/synth_$${mode}_$$seed/metrics.json || $(PY) train_classifier.py --data $(DATA256) \
			--split 100 --size $(XDSIZE) --epochs 5 --batch-size 16 --lr 1e-3 $(NEWSCOPE) $$guide --holdout 0.2 \
			--masks $(XM)/synth_0/masks --seed $$seed --out $(XG)/synth_$${mode}_$$seed | tail -2; \
		test -f $(XG)/tecom_$${mode}_$$seed/metrics.json || $(PY) train_classifier.py $(ONTECOM) --lr 1e-3 \
			$(NEWSCOPE) $$guide --holdout 0.2 --masks $(XM)/tecom_0/masks --seed $$seed \
			--out $(XG)/tecom_$${mode}_$$seed | tail -2; \
		for source in synth tecom; do for target in $(DATA256) $(TECOM) tta; do \
			masker=$$(test $$mode = nomask || echo --masker $(XM)/$${source}_0/checkpoint.pt); \
			data=$$target; tta=; \
			if [ $$target = tta ]; then tta=--tta; data=$(DATA256); [ $$source = tecom ] && data=$(TECOM); fi; \
			json=$(XG)/$${source}_$${mode}_$$seed/on_$$(basename $$data)$${tta:+_tta}.json; \
			test -f $$json || $(PY) evaluate.py $(XG)/$${source}_$${mode}_$$seed/checkpoint.pt --data $$data \
				$$masker $$tta --json $$json | tail -2; \
		done; done; \
	done; done
	$(PY) sweep_table.py $(XG)

# the two maskers of crossdomain-guide, seeds GUIDE_SEEDS (seed 0 draws the classifiers' masks), each
# scored on both sources' val, with and without --tta: $(XM)/table.md
crossdomain-maskers: install
	test -d $(DATA256)/WBC_100 || $(PY) synth.py $(DATA256) --scale 0.1 --size 256 --seed 0
	for seed in $(GUIDE_SEEDS); do \
		test -f $(XM)/synth_$$seed/metrics.json || $(PY) train_masker.py --data $(DATA256) --split 100 \
			--size $(XDSIZE) --epochs 15 --batch-size 8 --lr 2e-3 $(NEWSCOPE) --seed $$seed --out $(XM)/synth_$$seed; \
		test -f $(XM)/tecom_$$seed/metrics.json || $(PY) train_masker.py --data $(TECOM) --split 100 \
			--size $(XDSIZE) --epochs 30 --batch-size 8 $(NEWSCOPE) --seed $$seed --out $(XM)/tecom_$$seed; \
		for source in synth tecom; do for data in $(DATA256) $(TECOM); do for tta in "" --tta; do \
			json=$(XM)/$${source}_$$seed/on_$$(basename $$data)$${tta:+_tta}.json; \
			test -f $$json || $(PY) evaluate.py $(XM)/$${source}_$$seed/checkpoint.pt --data $$data $$tta \
				--json $$json | tail -1; \
		done; done; done; \
	done
	$(PY) sweep_table.py $(XM)
