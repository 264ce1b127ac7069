set -u
O=/tmp/o; mkdir -p $O
. scripts/gpu_env.sh
export GPU_ENV_SITE_READY=1
machine_info $O/machine.txt; echo "tree $(cat REV), base $(cat base/REV)" >> $O/machine.txt
timeout -s INT 100 $PY -m pytest tests/test_triton_mixed.py tests/test_cuda_graph.py -q --device cuda -n 4 -p conformance.plugin > $O/unit.log 2>&1; echo "unit rc=$?" >> $O/unit.log; tail -3 $O/unit.log
for r in 1 2; do
(cd base && PYTHONPATH="/tmp/site:$PWD" timeout -s INT 120 $PY ../scripts/gpu_mixed_steps.py $O/base$r --budget-s 35 --no-flashinfer > $O/base$r.log 2>&1); echo base rc=$?
timeout -s INT 120 $PY scripts/gpu_mixed_steps.py $O/new$r --budget-s 35 --no-flashinfer > $O/new$r.log 2>&1; echo new rc=$?
done
for f in base1 new1 base2 new2; do grep "^|" $O/$f/mixed_steps.md | cut -d'|' -f2,7,10; done
cp $O/machine.txt $OUT/; tar czf $OUT/all.tgz -C $O .
