//! Elaboration errors: one `check(src, expect)` per case, asserting each
//! diagnostic's `file:line:col` and message. Sources with several mistakes
//! show that all of them are reported together, without cascades.

use dlc::diag::{one_line, SourceMap};
use dlc::elab::{elaborate, ElabOptions};
use expect_test::{expect, Expect};

fn render(diags: &[dlc::diag::Diagnostic], sources: &SourceMap) -> String {
    let mut s: String = diags.iter().map(|d| one_line(d, sources) + "\n").collect();
    if s.is_empty() {
        s.push_str("(no diagnostics)\n");
    }
    s
}

/// `dlc check`: every model over symbolic dims.
fn check(src: &str, expected: Expect) {
    let mut sources = SourceMap::default();
    let file = sources.add("test.dl", src);
    let diags = dlc::elab::check(&mut sources, file);
    expected.assert_eq(&render(&diags, &sources));
}

/// `dlc compile`/`run`: one model with sizes.
fn check_elab(src: &str, opts: ElabOptions, expected: Expect) {
    let mut sources = SourceMap::default();
    let file = sources.add("test.dl", src);
    let diags = match elaborate(&mut sources, file, &opts) {
        Ok(e) => e.warnings,
        Err(d) => d,
    };
    expected.assert_eq(&render(&diags, &sources));
}

fn shapes(pairs: &[(&str, &[usize])]) -> ElabOptions {
    ElabOptions {
        input_shapes: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect(),
        ..ElabOptions::default()
    }
}

// ------------------------------------------------------------------ names

#[test]
fn unknown_function_with_suggestion() {
    check(
        "model m {\n    input x: f32[N, 4]\n    y = x |> desne(3)\n}\n",
        expect![[r#"
            test.dl:3:14: error: unknown function `desne`; did you mean `dense`?
        "#]],
    );
}

#[test]
fn unknown_function_without_suggestion() {
    check(
        "model m {\n    input x: f32[N, 4]\n    output y = frobnicate(x)\n}\n",
        expect![[r#"
            test.dl:3:16: error: unknown function `frobnicate`
        "#]],
    );
}

#[test]
fn unknown_name_with_suggestion() {
    check(
        "model m {\n    input image: f32[N, 4]\n    output y = relu(imgae)\n}\n",
        expect![[r#"
            test.dl:3:21: error: unknown name `imgae`; did you mean `image`?
        "#]],
    );
}

#[test]
fn function_used_as_value() {
    check(
        "model m {\n    input x: f32[N, 4]\n    output y = x + relu\n}\n",
        expect![[r#"
            test.dl:3:20: error: `relu` is a function, not a value; call it, e.g. `relu(x)` or `x |> relu`
        "#]],
    );
}

#[test]
fn rebinding_names_both_places() {
    let src = "model m {\n    input x: f32[N, 4]\n    h = relu(x)\n    h = tanh(x)\n    output y = h\n}\n";
    check(
        src,
        expect![[r#"
            test.dl:4:5: error: `h` is already bound; a name is bound once per scope
        "#]],
    );
    let mut sources = SourceMap::default();
    let file = sources.add("test.dl", src);
    let d = dlc::elab::check(&mut sources, file);
    assert_eq!(sources.line_col(file, d[0].related[0].0.start), (3, 5));
}

// ---------------------------------------------------------- arity, keywords

#[test]
fn missing_argument() {
    check(
        "model m {\n    input x: f32[N, 4]\n    y = x |> dense\n}\n",
        expect![[r#"
            test.dl:3:9: error: `dense` is missing argument `units`
        "#]],
    );
}

#[test]
fn too_many_arguments() {
    check(
        "model m {\n    input x: f32[N, 4]\n    output y = relu(x, x)\n}\n",
        expect![[r#"
            test.dl:3:24: error: `relu` takes at most 1 argument but 2 were given
        "#]],
    );
}

#[test]
fn unknown_keyword_with_suggestion() {
    check(
        "model m {\n    input x: f32[N, 4]\n    y = dense(x, unit=3)\n}\n",
        expect![[r#"
            test.dl:3:18: error: `dense` has no argument named `unit`; did you mean `units`?
        "#]],
    );
}

#[test]
fn duplicate_argument() {
    check(
        "model m {\n    input x: f32[N, 4]\n    y = dense(x, 3, units=4)\n}\n",
        expect![[r#"
            test.dl:3:21: error: `dense` got two values for argument `units`
        "#]],
    );
}

#[test]
fn keyword_errors_of_primitives() {
    check(
        "model m {\n    input x: f32[N, 4]\n    output a = softmax(x, axes=0)\n    output b = sum(x, axis=5)\n}\n",
        expect![[r#"
            test.dl:3:27: error: `softmax` has no argument named `axes`; did you mean `axis`?
            test.dl:4:16: error: sum: axis 5 is out of range for a tensor of rank 2
        "#]],
    );
}

#[test]
fn argument_kind_mismatch() {
    check(
        "model m {\n    input x: f32[N, 4]\n    y = dense(x, x)\n}\n",
        expect![[r#"
            test.dl:3:18: error: argument `units` of `dense` must be an int, got a tensor f32[N, 4]
        "#]],
    );
}

#[test]
fn pattern_rank_mismatch() {
    check(
        "model m {\n    input x: f32[N, 784]\n    c = x |> conv2d(6, kernel=5)\n}\n",
        expect![[r#"
            test.dl:3:9: error: argument `x` of `conv2d` must have rank 4 (f32[N, C, H, W]), got f32[N, 784]
        "#]],
    );
}

#[test]
fn pattern_dtype_mismatch() {
    check(
        "model m {\n    input x: f32[N, 7]\n    e = x |> embedding(10, 4)\n}\n",
        expect![[r#"
            test.dl:3:9: error: argument `ids` of `embedding` must be i32[...], got f32[N, 7]
        "#]],
    );
}

// ------------------------------------------------------ parameter creation

#[test]
fn two_layers_in_one_binding() {
    check(
        "model m {\n    input x: f32[N, 4]\n    y = x |> dense(8) |> relu |> dense(2)\n}\n",
        expect![[r#"
            test.dl:3:34: error: the binding `y` has two calls that create parameters (`dense` and `dense`)
        "#]],
    );
}

#[test]
fn layer_inside_return() {
    check(
        "fn head(x) {\n    return x |> dense(2)\n}\nmodel m {\n    input x: f32[N, 4]\n    output y = head(x)\n}\n",
        expect![[r#"
            test.dl:2:17: error: `dense` creates parameters, so it cannot be called inside `return`; bind it to a name first
        "#]],
    );
}

#[test]
fn layer_not_bound() {
    check(
        "model m {\n    input x: f32[N, 4]\n    param w: f32[dense(x, 2)]\n}\n",
        expect![[r#"
            test.dl:3:18: error: `dense` creates parameters, so it cannot be called in a type; bind it to a name
        "#]],
    );
}

#[test]
fn recursion() {
    check(
        "fn f(x) {\n    y = f(x)\n    return y\n}\nmodel m {\n    input x: f32[N, 4]\n    output y = f(x)\n}\n",
        expect![[r#"
            test.dl:2:9: error: `f` calls itself; recursion is not supported because fns are expanded at each call
        "#]],
    );
}

#[test]
fn missing_return_and_statements_after_return() {
    check(
        "fn f(x) {\n    y = relu(x)\n}\nfn g(x) {\n    return x\n    z = x\n}\nmodel m {\n    input x: f32[N, 4]\n    output a = f(x)\n    output b = g(x)\n}\n",
        expect![[r#"
            test.dl:1:4: error: fn `f` has no `return`
            test.dl:6:5: error: this statement comes after `return` and is never reached
        "#]],
    );
}

// ------------------------------------------------------------ shape errors

#[test]
fn conv_channels_name_the_weight() {
    check(
        "model m {\n    input x: f32[N, 3, 8, 8]\n    param w: f32[4, 1, 3, 3]\n    output y = conv(x, w)\n}\n",
        expect![[r#"
            test.dl:4:16: error: conv: input has 3 channels but w expects 1
        "#]],
    );
}

#[test]
fn matmul_inner_dims() {
    check(
        "model m {\n    input a: f32[N, 5]\n    param w: f32[4, 3]\n    output y = a @ w\n}\n",
        expect![[r#"
            test.dl:4:16: error: matmul: inner dimensions differ: [N, 5] @ [4, 3] (5 vs 4)
        "#]],
    );
}

#[test]
fn broadcasting() {
    check(
        "model m {\n    input a: f32[N, 5]\n    input b: f32[N, 4]\n    output y = a + b\n}\n",
        expect![[r#"
            test.dl:4:16: error: +: shapes [N, 5] and [N, 4] do not broadcast
        "#]],
    );
}

#[test]
fn bad_reshape() {
    check(
        "model m {\n    input a: f32[2, 3, 4]\n    output y = reshape(a, [5, -1])\n    output z = reshape(a, [5, 5])\n}\n",
        expect![[r#"
            test.dl:3:16: error: reshape: cannot reshape [2, 3, 4] (24 elements) to [5, -1]
            test.dl:4:16: error: reshape: cannot reshape [2, 3, 4] (24 elements) to [5, 5] (25 elements)
        "#]],
    );
}

#[test]
fn pooling_window_larger_than_input() {
    check(
        "model m {\n    input x: f32[N, 3, 4, 4]\n    output y = max_pool2d(x, 5)\n    output z = avg_pool2d(x, 2, pad=2)\n}\n",
        expect![[r#"
            test.dl:3:16: error: max_pool2d: window 5 is larger than the padded input 4 along the height
            test.dl:4:37: error: avg_pool2d: pad 2 must be smaller than the window 2
        "#]],
    );
}

#[test]
fn lstm_features() {
    check(
        "model m {\n    input x: f32[N, T, 6]\n    param w_x: f32[4, 20]\n    param w_h: f32[5, 20]\n    param b: f32[20]\n    output y = lstm_seq(x, w_x, w_h, b)\n}\n",
        expect![[r#"
            test.dl:6:16: error: lstm_seq: input has 6 features but w_x expects 4
        "#]],
    );
}

#[test]
fn attention_dims() {
    check(
        "model m {\n    input q: f32[2, 3, 4]\n    input k: f32[2, 5, 8]\n    input v: f32[2, 5, 8]\n    output y = attention(q, k, v)\n    output z = attention(k, k, q, causal=true)\n}\n",
        expect![[r#"
            test.dl:5:16: error: attention: q has feature size 4 but k has 8
            test.dl:6:16: error: attention: k has 5 positions but v has 3
        "#]],
    );
}

#[test]
fn concat_mismatch() {
    check(
        "model m {\n    input a: f32[N, 3]\n    input b: f32[N, 4, 1]\n    output y = concat([a, b], 1)\n}\n",
        expect![[r#"
            test.dl:4:16: error: concat: operand 1 has shape [N, 4, 1] but operand 0 has [N, 3]; all sizes except axis 1 must match
        "#]],
    );
}

#[test]
fn self_attention_heads_must_divide() {
    check(
        "model m {\n    input x: f32[N, T, 6]\n    a = x |> self_attention(heads=4)\n}\n",
        expect![[r#"
            std.dl:55:22: error: reshape: cannot reshape [N, T, 6] (6*N*T elements) to [N, T, 4, 1] (4*N*T elements)
        "#]],
    );
}

// ------------------------------------------------------------- dimensions

#[test]
fn successor_symbol_differs_under_check() {
    check(
        "model m {\n    input a: f32[N, 4]\n    input b: f32[N + 1, 4]\n    output y = a + b\n}\n",
        expect![[r#"
            test.dl:4:16: error: +: shapes [N, 4] and [N + 1, 4] do not broadcast
        "#]],
    );
}

#[test]
fn symbolic_check_accepts_what_holds_for_every_size() {
    check(
        "model m {\n    input x: f32[N, T, 8]\n    h = reshape(x, [-1, 8])\n    output y = reshape(h, [N, T, 2, 4])\n    output z = slice(x, 1, 1, -1)\n    output l = last(x)\n}\n",
        expect![[r#"
            (no diagnostics)
        "#]],
    );
}

#[test]
fn conflicting_symbols_from_inputs() {
    check_elab(
        "model m {\n    input a: f32[N, 4]\n    input b: f32[N, 4]\n    output y = a + b\n}\n",
        shapes(&[("a", &[2, 4]), ("b", &[3, 4])]),
        expect![[r#"
            test.dl:3:18: error: dimension `N` is 3 in input `b` but 2 in input `a`
        "#]],
    );
}

#[test]
fn dim_flag_contradicting_an_input() {
    let mut opts = shapes(&[("a", &[2, 4])]);
    opts.dims.insert("N".into(), 5);
    check_elab(
        "model m {\n    input a: f32[N, 4]\n    output y = relu(a)\n}\n",
        opts,
        expect![[r#"
            test.dl:2:18: error: `--dim N=5` contradicts input `a`, whose shape gives `N` = 2
        "#]],
    );
}

#[test]
fn input_shape_contradicting_the_declaration() {
    check_elab(
        "model m {\n    input a: f32[N, 4]\n    output y = relu(a)\n}\n",
        shapes(&[("a", &[2, 5])]),
        expect![[r#"
            test.dl:2:14: error: input `a` is declared f32[N, 4] = [2, 4], but the given tensor has shape [2, 5]
        "#]],
    );
}

#[test]
fn unbound_symbol() {
    check_elab(
        "model m {\n    input x: f32[N, 4]\n    output y = relu(x)\n}\n",
        ElabOptions::default(),
        expect![[r#"
            test.dl:2:18: error: dimension symbol `N` has no size; give it with `--dim N=...`
        "#]],
    );
}

#[test]
fn non_scalar_loss() {
    check(
        "model m {\n    input x: f32[N, 4]\n    loss = x * x\n}\n",
        expect![[r#"
            test.dl:3:12: error: the loss must be a scalar f32[], got f32[N, 4]; reduce it, e.g. with mean(...) or sum(...)
        "#]],
    );
}

#[test]
fn train_block_errors() {
    check(
        "model m {\n    input x: f32[N, 4]\n    output y = relu(x)\n    train {\n        optimizer = sgdd(lr=0.1)\n        regularize = l2(-1)\n        schedule = 3\n    }\n}\n",
        expect![[r#"
            test.dl:5:21: error: unknown optimizer `sgdd`; did you mean `sgd`? expected one of sgd, adam
            test.dl:6:25: error: `l2`: `lambda` must be a finite non-negative number, got -1
            test.dl:7:9: error: unknown train setting `schedule`; the settings are `optimizer` and `regularize`
        "#]],
    );
}

#[test]
fn std_shadowing_warns() {
    check(
        "fn dense(x, units: int) {\n    return x\n}\nmodel m {\n    input x: f32[N, 4]\n    output y = dense(x, 3)\n}\n",
        expect![[r#"
            test.dl:1:4: warning: fn `dense` shadows the standard library's `dense`
        "#]],
    );
}

// ---------------------------------------------------- several at once

#[test]
fn all_errors_of_a_file_are_reported() {
    check(
        "model m {\n    input x: f32[N, 3, 8, 8]\n    param w: f32[4, 1, 3, 3]\n    a = conv(x, w)\n    b = relu(a)\n    c = x |> dense(3) |> dense(2)\n    d = undefined_thing + 1\n    loss = sum(x, axis=1)\n}\n",
        expect![[r#"
            test.dl:4:9: error: conv: input has 3 channels but w expects 1
            test.dl:6:26: error: the binding `c` has two calls that create parameters (`dense` and `dense`)
            test.dl:7:9: error: unknown name `undefined_thing`
            test.dl:8:12: error: the loss must be a scalar f32[], got f32[N, 8, 8]; reduce it, e.g. with mean(...) or sum(...)
        "#]],
    );
}

#[test]
fn errors_in_two_models_and_a_fn() {
    check(
        "fn block(x: f32[N, C]) {\n    a = x |> dense(C)\n    return a @ a\n}\nmodel one {\n    input x: f32[N, 4]\n    b = block(x)\n    output y = b\n}\nmodel two {\n    input x: f32[N, 4]\n    output y = x |> relu(2)\n    output y = tanh(x)\n}\n",
        expect![[r#"
            test.dl:3:12: error: matmul: inner dimensions differ: [N, 4] @ [N, 4] (4 vs N)
            test.dl:12:26: error: `relu` takes at most 1 argument but 2 were given
            test.dl:13:12: error: `y` is already bound; a name is bound once per scope
        "#]],
    );
}

#[test]
fn poisoned_bindings_do_not_cascade() {
    check(
        "model m {\n    input x: f32[N, 4]\n    h = x @ x\n    g = relu(h) + h\n    output y = g |> dense(3)\n    loss = mean(y)\n}\n",
        expect![[r#"
            test.dl:3:9: error: matmul: inner dimensions differ: [N, 4] @ [N, 4] (4 vs N)
        "#]],
    );
}

#[test]
fn pattern_symbols_must_agree_across_arguments() {
    check(
        "fn add(a: f32[N, D], b: f32[N, D]) {\n    return a + b\n}\nmodel m {\n    input x: f32[B, 4]\n    input y: f32[B, 5]\n    output z = add(x, y)\n}\n",
        expect![[r#"
            test.dl:7:23: error: argument `b` of `add` has size 5 where its pattern f32[N, D] needs D = 4
        "#]],
    );
}

#[test]
fn mutual_recursion() {
    check(
        "fn f(x) {\n    return g(x)\n}\nfn g(x) {\n    return f(x)\n}\nmodel m {\n    input x: f32[N, 4]\n    output y = f(x)\n}\n",
        expect![[r#"
            test.dl:5:12: error: `f` calls itself (f -> g -> f); recursion is not supported because fns are expanded at each call
        "#]],
    );
}

#[test]
fn syntax_and_elaboration_errors_together() {
    check(
        "model m {\n    input x: f32[N, 4]\n    h = relu(x +)\n    output y = tanh(z)\n}\n",
        expect![[r#"
            test.dl:3:17: error: expected an expression, found ')'
            test.dl:4:21: error: unknown name `z`
        "#]],
    );
}

#[test]
fn statements_in_the_wrong_item() {
    check(
        "fn f(x) {\n    input y: f32[3]\n    return x\n}\nmodel m {\n    input x: f32[N, 4]\n    output y = f(x)\n    return x\n}\n",
        expect![[r#"
            test.dl:2:5: error: 'input' is not allowed in a fn; a fn body holds bindings, 'param' and 'return'
            test.dl:8:5: error: 'return' is only allowed in a fn
        "#]],
    );
}

#[test]
fn bad_attributes() {
    check(
        "model m {\n    input x: f32[N, 3, 8, 8]\n    param w: f32[4, 3, 3, 3]\n    output a = conv(x, w, stride=2, pad=\"same\")\n    output b = conv(x, w, stride=0)\n    output c = max_pool2d(x, 2.5)\n    output d = transpose(x, [0, 1, 1, 2])\n}\n",
        expect![[r#"
            test.dl:4:41: error: conv: pad="same" needs stride 1, got stride 2
            test.dl:5:34: error: conv: `stride` must be at least 1, got 0
            test.dl:6:30: error: max_pool2d: `window` must be an integer, got the number 2.5
            test.dl:7:16: error: transpose: [0, 1, 1, 2] is not a permutation of the 4 axes of [N, 3, 8, 8]
        "#]],
    );
}

#[test]
fn bad_initialisers_and_param_types() {
    check(
        "model m {\n    param a: f32[3] = gaussian(1.0)\n    param b: i32[3]\n    param c: f32[3] = uniform(1.0, 0.5)\n    param d: f32[-2]\n}\n",
        expect![[r#"
            test.dl:2:23: error: unknown initialiser `gaussian`; expected zeros, ones, normal(std), uniform(lo, hi), glorot_uniform or he_normal
            test.dl:3:14: error: parameter `b` must be f32 (parameters are trained), not i32
            test.dl:4:23: error: uniform: `lo` (1) is greater than `hi` (0.5)
            test.dl:5:18: error: a dimension must not be negative, got -2
        "#]],
    );
}

/// Every line deleted and every digit replaced by an extreme value, in
/// every example and golden model: diagnostics, never a panic.
#[test]
fn mutated_sources_never_panic() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("lang/examples"))
        .expect("examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "dl"))
        .collect();
    let mut stack = vec![root.join("tests/golden")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("golden dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "model.dl") {
                files.push(p);
            }
        }
    }
    files.push(root.join("lang/std.dl"));
    let mut runs = 0;
    for f in files {
        let src = std::fs::read_to_string(&f).expect("source");
        let lines: Vec<&str> = src.lines().collect();
        let mut variants = Vec::new();
        for i in 0..lines.len() {
            let mut v = lines.clone();
            v.remove(i);
            variants.push(v.join("\n"));
        }
        for (i, _) in src.match_indices(|c: char| c.is_ascii_digit()) {
            for rep in ["0", "99999999999999999999"] {
                variants.push(format!("{}{rep}{}", &src[..i], &src[i + 1..]));
            }
        }
        for v in variants {
            let mut sources = SourceMap::default();
            let file = sources.add("m.dl", v);
            let _ = dlc::elab::check(&mut sources, file);
            let _ = elaborate(&mut sources, file, &ElabOptions::default());
            runs += 1;
        }
    }
    assert!(runs > 1000, "only {runs} variants");
}

#[test]
fn absurd_sizes_are_errors() {
    check_elab(
        "model m {\n    input x: f32[N=100000, 100000, 100000]\n    output y = max_pool2d(x, 99999999)\n}\n",
        ElabOptions::default(),
        expect![[r#"
            test.dl:2:11: error: input `x`: the tensor f32[100000, 100000, 100000] has more than 2^34 elements
            test.dl:3:30: error: max_pool2d: `window` is 99999999, larger than the supported 16777216
        "#]],
    );
}

#[test]
fn size_dependent_shapes_warn_under_check_when_defaults_fit() {
    // D/4*4 == D only when 4 divides D: valid at the default D=64.
    check(
        "model m {\n    input x: f32[N=2, T=3, D=64]\n    a = x |> self_attention(heads=4)\n    output y = a\n}\n",
        expect![[r#"
            std.dl:55:22: warning: reshape: cannot reshape [N, T, D] (D*N*T elements) to [N, T, 4, D/4] (4*N*T*(D/4) elements)
        "#]],
    );
    // Without defaults the same model is an error under check.
    check(
        "model m {\n    input x: f32[N, T, D]\n    a = x |> self_attention(heads=4)\n    output y = a\n}\n",
        expect![[r#"
            std.dl:55:22: error: reshape: cannot reshape [N, T, D] (D*N*T elements) to [N, T, 4, D/4] (4*N*T*(D/4) elements)
        "#]],
    );
}

#[test]
fn unknown_function_in_an_unused_fn() {
    check(
        "fn helper(x) {\n    return x |> relux\n}\nfn used(x) {\n    return softmx(x)\n}\nmodel m {\n    input x: f32[N, 4]\n    output y = used(x)\n}\n",
        expect![[r#"
            test.dl:2:17: error: unknown function `relux`; did you mean `relu`?
            test.dl:5:12: error: unknown function `softmx`; did you mean `softmax`?
        "#]],
    );
}

#[test]
fn very_deep_expressions_are_an_error_not_a_crash() {
    let src = format!(
        "model m {{\n    input x: f32[3]\n    output y = x{}\n}}\n",
        " + x".repeat(400)
    );
    check(
        &src,
        expect![[r#"
            test.dl:3:16: error: expression nested more than 256 levels deep; split it into several bindings
        "#]],
    );
}

#[test]
fn input_of_the_wrong_rank_is_one_error() {
    check_elab(
        "model m {\n    input x: f32[N, 4]\n    input y: f32[N, 4]\n    output z = x + y\n}\n",
        shapes(&[("x", &[2, 3, 4])]),
        expect![[r#"
            test.dl:2:14: error: input `x` is declared with rank 2 (f32[N, 4]), but the given tensor has shape [2, 3, 4]
        "#]],
    );
}

/// An error inside std.dl is reported there, with the chain of calls back to
/// the user's line as related spans.
#[test]
fn errors_in_std_carry_the_call_chain() {
    let mut sources = SourceMap::default();
    let file = sources.add(
        "test.dl",
        "model m {\n    input x: f32[N, T, 6]\n    a = x |> self_attention(heads=4)\n}\n",
    );
    let d = dlc::elab::check(&mut sources, file);
    assert_eq!(d.len(), 1);
    let chain: Vec<String> = d[0]
        .related
        .iter()
        .map(|(s, label)| {
            let (l, c) = sources.line_col(s.file, s.start);
            format!("{}:{l}:{c} {label}", sources.files[s.file as usize].name)
        })
        .collect();
    let q_line = dlc::elab::STD_SOURCE
        .lines()
        .position(|l| l.trim_start().starts_with("q = split_heads("))
        .expect("self_attention splits q")
        + 1;
    assert_eq!(
        chain,
        vec![
            format!("std.dl:{q_line}:9 in this call to `split_heads`"),
            "test.dl:3:9 in this call to `self_attention`".to_string()
        ]
    );
}

#[test]
fn model_without_results_warns() {
    check(
        "model m {\n    input x: f32[N, 4]\n    h = relu(x)\n}\n",
        expect![[r#"
            test.dl:1:7: warning: model `m` has no `output` and no `loss`, so it computes nothing
        "#]],
    );
}
