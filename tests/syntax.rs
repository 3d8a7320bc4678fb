//! The front end's syntax layer: error messages and positions for broken
//! input (data-driven, one `check` per case), and the shape of the tree for
//! valid input (precedence, pipe desugaring, newline rules, spans).

use dlc::diag::{one_line, render, Diagnostic, SourceMap};
use dlc::syntax::ast::{ExprKind, Item, StmtKind};
use dlc::syntax::{parse, sexpr};
use expect_test::{expect, Expect};

/// Parses `src` as `t.dl` and compares every diagnostic, one per line, as
/// `t.dl:line:col: error: message`.
fn check(src: &str, expected: Expect) {
    let (_, diags) = parse(src, 0);
    let mut map = SourceMap::default();
    map.add("t.dl", src);
    let got: Vec<String> = diags.iter().map(|d| one_line(d, &map)).collect();
    expected.assert_eq(&got.join("\n"));
}

/// Parses `src`, asserts it has no diagnostics and compares the tree.
fn check_tree(src: &str, expected: Expect) {
    let (file, diags) = parse(src, 0);
    assert!(diags.is_empty(), "unexpected diagnostics: {diags:?}");
    expected.assert_eq(&sexpr(&file));
}

/// The tree of the single statement in `model m { ... }`.
fn stmt(body: &str) -> String {
    let src = format!("model m {{\n{body}\n}}\n");
    let (file, diags) = parse(&src, 0);
    assert!(
        diags.is_empty(),
        "unexpected diagnostics for {body:?}: {diags:?}"
    );
    let Some(Item::Model(m)) = file.items.first() else {
        panic!("no model parsed from {body:?}");
    };
    m.body
        .iter()
        .map(dlc::syntax::sexpr_stmt)
        .collect::<Vec<_>>()
        .join("\n")
}

// ---- lexical errors ------------------------------------------------------

#[test]
fn bad_character() {
    check(
        "model m {\n    y = a $ b\n}\n",
        expect![[r#"t.dl:2:11: error: unexpected character '$'"#]],
    );
}

#[test]
fn leading_point_number() {
    check(
        "model m {\n    y = x * .5\n}\n",
        expect!["t.dl:2:13: error: malformed number '.5'"],
    );
}

#[test]
fn malformed_numbers() {
    check(
        "model m {\n    a = 1e+\n    b = 12abc\n}\n",
        expect![[r#"
            t.dl:2:9: error: malformed number '1e+'
            t.dl:3:9: error: malformed number '12abc'"#]],
    );
}

#[test]
fn unterminated_string() {
    check(
        "model m {\n    y = conv(x, w, pad=\"same)\n    z = y\n}\n",
        expect![[
            r#"t.dl:2:24: error: unterminated string — expected a closing '"' before the end of the line"#
        ]],
    );
}

// ---- syntax errors ---------------------------------------------------------

#[test]
fn unclosed_paren_at_end_of_line() {
    check(
        "model m {\n    y = relu(x\n    z = y\n}\n",
        expect!["t.dl:2:13: error: unclosed '(' — expected ')' before the end of the line"],
    );
}

#[test]
fn unclosed_bracket_at_end_of_file() {
    check(
        "model m {\n    y = reshape(x, [2, 3",
        expect![[r#"
        t.dl:1:9: error: unclosed '{' — expected '}' before the end of the file
        t.dl:2:20: error: unclosed '[' — expected ']' before the end of the file"#]],
    );
}

#[test]
fn unclosed_brace() {
    check(
        "model m {\n    y = relu(x)\n",
        expect!["t.dl:1:9: error: unclosed '{' — expected '}' before the end of the file"],
    );
}

#[test]
fn unclosed_brace_before_next_item() {
    check(
        "model m {\n    y = relu(x)\n\nfn f(x) {\n    return x\n}\n",
        expect!["t.dl:1:9: error: unclosed '{' — expected '}' before the next item ('fn')"],
    );
}

#[test]
fn mismatched_bracket() {
    check(
        "model m {\n    y = f(x]\n}\n",
        expect!["t.dl:2:12: error: mismatched ']' — expected ')' to close '('"],
    );
}

#[test]
fn missing_eq_in_binding() {
    check(
        "model m {\n    y relu(x)\n}\n",
        expect!["t.dl:2:7: error: expected '=' after 'y' in a binding 'y = EXPR', found 'relu'"],
    );
}

#[test]
fn missing_expression() {
    check(
        "model m {\n    y = (x + )\n}\n",
        expect!["t.dl:2:14: error: expected an expression, found ')'"],
    );
}

#[test]
fn stray_closing_paren() {
    check(
        "model m {\n    y = x )\n}\n",
        expect![
            "t.dl:2:11: error: expected the end of the statement (a new line or ';'), found ')'"
        ],
    );
}

#[test]
fn pipe_into_number() {
    check(
        "model m {\n    y = x |> 3\n}\n",
        expect![
            "t.dl:2:14: error: the right side of '|>' must be a function name or a call, found '3'"
        ],
    );
}

#[test]
fn pipe_into_expression() {
    check("model m {\n    y = x |> relu + 1\n}\n", expect!["t.dl:2:14: error: the right side of '|>' must be a function name or a call, found 'relu + 1'"]);
}

#[test]
fn missing_item_keyword() {
    check(
        "lenet {\n    input x: f32[2]\n}\n",
        expect!["t.dl:1:1: error: expected 'model' or 'fn' to start an item, found 'lenet'"],
    );
}

#[test]
fn missing_model_name() {
    check(
        "model {\n    y = x\n}\n",
        expect!["t.dl:1:7: error: expected a name after 'model', found '{'"],
    );
}

#[test]
fn ellipsis_outside_type() {
    check(
        "model m {\n    y = reshape(x, [..., 4])\n}\n",
        expect!["t.dl:2:21: error: '...' is only allowed inside a tensor type, as in f32[..., D]"],
    );
}

#[test]
fn loss_without_eq() {
    check(
        "model m {\n    loss cross_entropy(a, b)\n}\n",
        expect!["t.dl:2:10: error: 'loss' takes '=' and an expression, found 'cross_entropy'"],
    );
}

#[test]
fn input_without_type() {
    check("model m {\n    input x\n}\n", expect!["t.dl:2:12: error: expected ':' and a tensor type after the input name, found the end of the line"]);
}

#[test]
fn input_with_scalar_type() {
    check(
        "model m {\n    input x: int\n}\n",
        expect!["t.dl:2:14: error: expected a tensor type, found the scalar type 'int'"],
    );
}

#[test]
fn tensor_type_without_brackets() {
    check("model m {\n    input x: f32\n}\n", expect!["t.dl:2:17: error: expected '[' and the dimensions after 'f32' (write f32[] for a scalar), found the end of the line"]);
}

#[test]
fn default_on_a_dim_expression() {
    check(
        "model m {\n    input x: f32[2*N=3]\n}\n",
        expect!["t.dl:2:21: error: a default ('N=32') can only follow a symbol name"],
    );
}

#[test]
fn keyword_as_name() {
    check(
        "model m {\n    input = 3\n}\nfn f(loss) {\n    return loss\n}\n",
        expect![[r#"
        t.dl:2:11: error: expected a name after 'input', found '='
        t.dl:4:6: error: 'loss' is a keyword and cannot be used as a name
        t.dl:5:12: error: 'loss' is a keyword and cannot be used in an expression"#]],
    );
}

#[test]
fn statement_not_allowed_here() {
    check(
        "fn f(x) {\n    input y: f32[2]\n    return x\n}\nmodel m {\n    return 1\n}\n",
        expect![[r#"
            t.dl:2:5: error: 'input' is not allowed in a fn; a fn body holds bindings, 'param' and 'return'
            t.dl:6:5: error: 'return' is only allowed in a fn"#]],
    );
}

#[test]
fn positional_after_keyword_argument() {
    check(
        "model m {\n    y = conv(x, pad=1, w)\n}\n",
        expect!["t.dl:2:24: error: a positional argument cannot follow a keyword argument"],
    );
}

#[test]
fn train_entry_without_eq() {
    check(
        "model m {\n    train {\n        optimizer sgd(lr=0.1)\n    }\n}\n",
        expect![
            "t.dl:3:19: error: expected '=' after the training setting 'optimizer', found 'sgd'"
        ],
    );
}

// ---- several errors in one file -----------------------------------------

#[test]
fn every_statement_error_is_reported() {
    check(
        "model m {\n    input x: f32[N, 4\n    a = x |> dense(3\n    b = a + * 2\n    c = relu(b)\n    loss c\n}\n",
        expect![[r#"
            t.dl:2:17: error: unclosed '[' — expected ']' before the end of the line
            t.dl:3:19: error: unclosed '(' — expected ')' before the end of the line
            t.dl:4:13: error: expected an expression, found '*'
            t.dl:6:10: error: 'loss' takes '=' and an expression, found 'c'"#]],
    );
}

#[test]
fn errors_in_several_items() {
    check(
        "fn f(x: f32[N, ], k = ) {\n    return x @\n}\n\nmodel m {\n    y = f(x) |> [1]\n    output z = y $\n}\n\nmodel {\n}\n",
        expect![[r#"
            t.dl:1:23: error: expected an expression, found ')'
            t.dl:2:15: error: expected an expression, found the end of the line
            t.dl:6:17: error: the right side of '|>' must be a function name or a call, found '[1]'
            t.dl:7:18: error: unexpected character '$'
            t.dl:10:7: error: expected a name after 'model', found '{'"#]],
    );
}

#[test]
fn lexical_and_syntax_errors_together() {
    check(
        "model m {\n    a = \"open\n    b = 3..4\n    c = (a + b\n    d = c |> relu\n    e = d d\n}\n",
        expect![[r#"
            t.dl:2:9: error: unterminated string — expected a closing '"' before the end of the line
            t.dl:3:9: error: malformed number '3..4'
            t.dl:4:9: error: unclosed '(' — expected ')' before the end of the line
            t.dl:6:11: error: expected the end of the statement (a new line or ';'), found 'd'"#]],
    );
}

#[test]
fn broken_statement_keeps_its_binding() {
    // The binding survives with an error placeholder, so elaboration does
    // not follow up with "undefined name 'a'".
    let (file, diags) = parse("model m {\n    a = relu(,)\n    b = a\n}\n", 0);
    assert_eq!(diags.len(), 1);
    let Some(Item::Model(m)) = file.items.first() else {
        panic!("model lost")
    };
    assert_eq!(m.body.len(), 2);
    match &m.body[0].kind {
        StmtKind::Let { name, value } => {
            assert_eq!(name.name, "a");
            assert_eq!(value.kind, ExprKind::Error);
        }
        other => panic!("expected a binding, got {other:?}"),
    }
}

// ---- trees ---------------------------------------------------------------

#[test]
fn pipe_binds_loosest() {
    expect!["(let y (call relu (- a b)))"].assert_eq(&stmt("y = a - b |> relu"));
}

#[test]
fn unary_minus_binds_tighter_than_division() {
    expect!["(let y (/ (neg a) 2.0))"].assert_eq(&stmt("y = -a / 2.0"));
}

#[test]
fn multiplicative_and_additive_levels() {
    expect!["(let y (- (+ a (@ (* b c) d)) (/ e f)))"]
        .assert_eq(&stmt("y = a + b * c @ d - e / f"));
}

#[test]
fn pipe_into_call_puts_value_first() {
    expect!["(let y (call h (call g (call f a b k=v)) 1))"]
        .assert_eq(&stmt("y = a |> f(b, k=v) |> g |> h(1)"));
}

#[test]
fn parentheses_and_lists() {
    expect!["(let y (* (+ a b) (neg (- c [1 2.5 (neg 3)]))))"]
        .assert_eq(&stmt("y = (a + b) * -(c - [1, 2.5, -3])"));
}

#[test]
fn literals() {
    expect![[r#"(let y (call f 12 0.5 0.0001 3.0 0.25 "same" true false))"#]].assert_eq(&stmt(
        "y = f(12, 0.5, 1e-4, 3., 25e-2, \"same\", true, false)",
    ));
}

#[test]
fn multi_line_statements() {
    expect![[r#"
        (let y (call relu (call dense x 3)))
        (let z (+ y 1))
        (let w (call f a b k=2))
        (let v [1 2])
        (let u v)"#]].assert_eq(&stmt(
        "y = x\n    |> dense(3)\n    |> relu\nz = y +\n    1\nw = f(a,\n      b,\n      k=2\n)\nv = [\n  1, 2\n]; u = v",
    ));
}

#[test]
fn whole_file() {
    check_tree(
        r#"# a comment
fn block(x: f32[..., D], units: int, rate: float = 0.5, causal: bool, k = 3, n: int = 2) {
    param w: f32[D, 4*units] = glorot_uniform
    h = x @ w  # trailing comment
    return h
}

model lenet {
    input x: f32[N=32, 1, 28, 28]
    input label: i32[N]
    param s: f32[]
    param t: f32[H/2, 3] = normal(0.1)
    c1 = x |> conv2d(6, kernel=5, pad=2) |> relu
    output probs = softmax(c1)
    output c1
    loss = cross_entropy(c1, label)
    train {
        optimizer = sgd(lr=0.05, momentum=0.9)
        regularize = l2(5e-4)
    }
}
"#,
        expect![[r#"
            (fn block (x:f32[... D] units:int rate:float=0.5 causal:bool k=3 n:int=2)
              (param w f32[D (* 4 units)] glorot_uniform)
              (let h (@ x w))
              (return h)
            )
            (model lenet
              (input x f32[N=32 1 28 28])
              (input label i32[N])
              (param s f32[])
              (param t f32[(/ H 2) 3] (call normal 0.1))
              (let c1 (call relu (call conv2d x 6 kernel=5 pad=2)))
              (output probs (call softmax c1))
              (output c1)
              (loss (call cross_entropy c1 label))
              (train optimizer=(call sgd lr=0.05 momentum=0.9) regularize=(call l2 0.0005))
            )
        "#]],
    );
}

#[test]
fn spans_cover_their_text() {
    let src = "model m {\n    y = a + 2 |> f(b, k=1)\n    z = g(y)\n}\n";
    let (file, diags) = parse(src, 7);
    assert!(diags.is_empty());
    let Some(Item::Model(m)) = file.items.first() else {
        panic!("model lost")
    };
    let text = |s: dlc::ir::Span| &src[s.start as usize..s.end as usize];
    assert_eq!(m.span.file, 7);
    assert_eq!(text(m.span), &src[..src.len() - 1]);
    assert_eq!(text(m.body[0].span), "y = a + 2 |> f(b, k=1)");
    let StmtKind::Let { value, .. } = &m.body[0].kind else {
        panic!("not a binding")
    };
    // `|>` is loosest: the desugared call covers the whole pipe.
    assert_eq!(text(value.span), "a + 2 |> f(b, k=1)");
    let ExprKind::Call { callee, args } = &value.kind else {
        panic!("pipe not desugared")
    };
    assert_eq!(text(callee.span), "f");
    assert_eq!(args.len(), 3);
    assert_eq!(text(args[0].value.span), "a + 2");
    assert_eq!(args[2].name.as_ref().map(|n| n.name.as_str()), Some("k"));
    let StmtKind::Let { value, .. } = &m.body[1].kind else {
        panic!("not a binding")
    };
    assert_eq!(text(value.span), "g(y)");
}

// ---- rendering -----------------------------------------------------------

#[test]
fn render_shows_location_source_line_and_caret() {
    let src = "model m {\n    y = relu(x\n    z = y\n}\n";
    let mut map = SourceMap::default();
    map.add("net.dl", src);
    let (_, diags) = parse(src, 0);
    expect![[r#"
        error: unclosed '(' — expected ')' before the end of the line
          --> net.dl:2:13
          |
        2 |     y = relu(x
          |             ^

    "#]]
    .assert_eq(&render(&diags, &map));
}

#[test]
fn render_related_and_help() {
    let src = "model m {\n    a = x\n    a = y\n}\n";
    let mut map = SourceMap::default();
    map.add("net.dl", src);
    let d = Diagnostic::error(
        dlc::ir::Span {
            file: 0,
            start: 24,
            end: 25,
        },
        "'a' is already bound",
    )
    .with_related(
        dlc::ir::Span {
            file: 0,
            start: 14,
            end: 15,
        },
        "first bound here",
    )
    .with_help("pick another name");
    expect![[r#"
        error: 'a' is already bound
          --> net.dl:3:5
          |
        2 |     a = x
          |     - first bound here
        3 |     a = y
          |     ^
          |
          = help: pick another name

    "#]]
    .assert_eq(&render(&[d], &map));
}

#[test]
fn render_clamps_out_of_range_spans() {
    let mut map = SourceMap::default();
    map.add("u.dl", "é = 1\n");
    let spans = [(1, 1), (0, 100), (50, 60), (6, 2)];
    let diags: Vec<Diagnostic> = spans
        .iter()
        .map(|&(start, end)| {
            Diagnostic::error(
                dlc::ir::Span {
                    file: 0,
                    start,
                    end,
                },
                "bad",
            )
        })
        .chain([Diagnostic::error(
            dlc::ir::Span {
                file: 9,
                start: 0,
                end: 1,
            },
            "elsewhere",
        )])
        .collect();
    let out = render(&diags, &map);
    assert_eq!(out.matches("error: bad").count(), 4);
    assert!(out.contains("elsewhere"));
}

#[test]
fn hostile_nesting_is_an_error_not_a_crash() {
    for opener in ["(", "[", "-", "f("] {
        let src = format!("model m {{\n    y = {}x\n}}\n", opener.repeat(100_000));
        let (_, diags) = parse(&src, 0);
        assert_eq!(diags.len(), 1, "{opener}: {diags:?}");
        assert_eq!(
            diags[0].message,
            "expression nested too deeply (more than 200 levels)"
        );
    }
    // Within the limit nesting is fine.
    let (_, diags) = parse(
        &format!(
            "model m {{\n    y = {}x{}\n}}\n",
            "(".repeat(150),
            ")".repeat(150)
        ),
        0,
    );
    assert!(diags.is_empty(), "{diags:?}");
}

#[test]
fn item_keyword_inside_train_block() {
    check(
        "model m {\n    train {\n    model n {\n}\n",
        expect![[r#"
            t.dl:1:9: error: unclosed '{' — expected '}' before the next item ('model')
            t.dl:2:11: error: unclosed '{' — expected '}' before the next item ('model')"#]],
    );
}

#[test]
fn run_of_junk_is_one_error() {
    check(
        "model m {\n    y = x |> relu ||> tanh ~~~ 1\n}\n",
        expect![[r#"
            t.dl:2:19: error: unexpected character '|'
            t.dl:2:28: error: unexpected characters '~~~'"#]],
    );
}

#[test]
fn braces_may_open_on_the_next_line_and_bom_is_ignored() {
    check_tree(
        "\u{feff}fn f(x)\n{\n    return x\n}\nmodel m\n{\n    train\n    {\n        optimizer = adam()\n    }\n}\n",
        expect![[r#"
            (fn f (x)
              (return x)
            )
            (model m
              (train optimizer=(call adam))
            )
        "#]],
    );
}

#[test]
fn pipe_at_end_of_body() {
    check(
        "model m {\n    y = x |>\n}\n",
        expect!["t.dl:2:13: error: expected a function name or a call after '|>', found the end of the line"],
    );
}

#[test]
fn param_without_eq_before_initialiser() {
    check(
        "model m {\n    param w: f32[3] normal(1.0)\n}\n",
        expect!["t.dl:2:21: error: expected '=' and an initialiser (or the end of the statement) after the param type, found 'normal'"],
    );
}

#[test]
fn unmatched_closers() {
    check(
        "}\nmodel m {\n    y = x\n    ]\n}}\n",
        expect![[r#"
            t.dl:1:1: error: unmatched '}' — no bracket is open here
            t.dl:4:5: error: unmatched ']' — no bracket is open here
            t.dl:5:2: error: unmatched '}' — no bracket is open here"#]],
    );
}

#[test]
fn declaration_without_keyword_gets_help() {
    let src = "model m {\n    x: f32[3]\n}\n";
    let mut map = SourceMap::default();
    map.add("t.dl", src);
    let (_, diags) = parse(src, 0);
    expect![[r#"
        error: expected '=' after 'x' in a binding 'x = EXPR', found ':'
          --> t.dl:2:6
          |
        2 |     x: f32[3]
          |      ^
          |
          = help: declare an input with 'input x: TYPE' or a parameter with 'param x: TYPE'

    "#]]
    .assert_eq(&render(&diags, &map));
}

#[test]
fn render_warning_in_second_file() {
    let mut map = SourceMap::default();
    map.add("std.dl", "fn dense(x) {\n    return x\n}\n");
    map.add("user.dl", "fn dense(x) {\n    return x\n}\n");
    let d = Diagnostic::warning(
        dlc::ir::Span {
            file: 1,
            start: 3,
            end: 8,
        },
        "'dense' shadows the standard library fn of the same name",
    )
    .with_related(
        dlc::ir::Span {
            file: 0,
            start: 3,
            end: 8,
        },
        "standard definition",
    );
    expect![[r#"
        warning: 'dense' shadows the standard library fn of the same name
          --> user.dl:1:4
          |
        1 | fn dense(x) {
          |    ^^^^^
          |
          --> std.dl:1:4
          |
        1 | fn dense(x) {
          |    ----- standard definition

    "#]]
    .assert_eq(&render(std::slice::from_ref(&d), &map));
    expect!["user.dl:1:4: warning: 'dense' shadows the standard library fn of the same name"]
        .assert_eq(&one_line(&d, &map));
}
