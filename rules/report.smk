# Provenance of every output, from the sentinels, as a page of `snakemake --report`.


rule provenance:
    input:
        rules.weights.input,
        rules.torch_dist.input,
        rules.fp8.input,
        rules.train.input,
        [PATHS.run(run).hf_sentinel for run in WF.runs],
    output:
        report(PATHS.provenance, category="provenance", caption="report/provenance.rst"),
    conda:
        "../envs/cpu.yaml"
    log:
        PATHS.rule_log("provenance"),
    localrule: True  # reads small sentinels only
    shell:
        "glmsnake step provenance --output {output:q} > {log:q} 2>&1"
