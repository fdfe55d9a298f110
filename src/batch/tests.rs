use super::*;

fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn shards_split_the_list_without_overlap() {
    for count in 1..=7 {
        let mut taken = vec![0; 23];
        for index in 0..count {
            let s = Shard::new(index, count, "t").unwrap();
            for (p, t) in taken.iter_mut().enumerate() {
                if s.owns(p) {
                    *t += 1;
                }
            }
        }
        assert!(taken.iter().all(|&t| t == 1), "{count}: {taken:?}");
    }
    let s = Shard::parse("2/3").unwrap();
    assert_eq!((s.index, s.count), (2, 3));
    assert!(s.owns(2) && s.owns(5) && !s.owns(3));
    for bad in ["3/3", "1/0", "a/2", "2", "-1/3"] {
        assert!(Shard::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn shard_from_slurm_and_kubernetes() {
    let none = env(&[]);
    assert_eq!(Shard::resolve(None, None, &none).unwrap(), Shard::ALL);
    let slurm = env(&[
        ("SLURM_ARRAY_TASK_ID", "4"),
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "5"),
    ]);
    let s = Shard::resolve(None, None, &slurm).unwrap();
    assert_eq!((s.index, s.count), (3, 5));
    // --shard wins over the environment.
    let given = Shard::parse("0/2").unwrap();
    assert_eq!(Shard::resolve(Some(given), None, &slurm).unwrap(), given);
    // A sparse array (--array=1,7) cannot be mapped: say so.
    let sparse = env(&[
        ("SLURM_ARRAY_TASK_ID", "7"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
    ]);
    let e = Shard::resolve(None, None, &sparse).unwrap_err().to_string();
    assert!(e.contains("--shard"), "{e}");
    let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
    let s = Shard::resolve(None, Some(4), &k8s).unwrap();
    assert_eq!((s.index, s.count), (2, 4));
    let e = Shard::resolve(None, None, &k8s).unwrap_err().to_string();
    assert!(e.contains("--shards"), "{e}");
    assert!(Shard::resolve(None, Some(3), &none).is_err());
}

#[test]
fn ids_are_stable_and_distinct() {
    assert_eq!(input_id("a/b.mp4"), input_id("a/b.mp4"));
    assert_ne!(input_id("a/b.mp4"), input_id("a/c.mp4"));
    assert_eq!(input_id("x").len(), 16);
    // SHA-256("abc") = ba7816bf8f01cfea...
    assert_eq!(input_id("abc"), "ba7816bf8f01cfea");
}

#[test]
fn folder_lists_media_recursively_in_a_stable_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for f in [
        "b.mp4",
        "a/z.png",
        "a/y.MOV",
        ".hidden.mp4",
        "notes.txt",
        "c/d/e.jpg",
    ] {
        let p = root.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"x").unwrap();
    }
    std::fs::create_dir_all(root.join("out/x")).unwrap();
    std::fs::write(root.join("out/x/r.mp4"), b"x").unwrap();
    let keys: Vec<String> = folder_work_list(root, Some(&root.join("out")))
        .unwrap()
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(keys, ["a/y.MOV", "a/z.png", "b.mp4", "c/d/e.jpg"]);
    assert!(matches!(
        folder_work_list(&root.join("c/d/e.jpg"), None),
        Err(BatchError::Input { .. })
    ));
}

#[test]
fn manifest_lines_resolve_against_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("list.txt");
    std::fs::write(&m, "\u{feff}# archive\nclips/a.mp4\n\n/abs/b.jpg \n").unwrap();
    let items = manifest_work_list(&m).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].key, "clips/a.mp4");
    assert_eq!(items[0].path, dir.path().join("clips/a.mp4"));
    assert_eq!(items[1].path, PathBuf::from("/abs/b.jpg"));
    std::fs::write(&m, "a.mp4\nb.mp4\na.mp4\n").unwrap();
    let e = manifest_work_list(&m).unwrap_err().to_string();
    assert!(e.contains("line 3") && e.contains("line 1"), "{e}");
}

#[test]
fn a_second_work_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = vec![WorkItem::new("a.mp4".into(), "a.mp4".into())];
    claim_work_list(dir.path(), &a).unwrap();
    claim_work_list(dir.path(), &a).unwrap();
    assert_eq!(read_work_list(dir.path()).unwrap(), a);
    let b = vec![WorkItem::new("b.mp4".into(), "b.mp4".into())];
    let e = claim_work_list(dir.path(), &b).unwrap_err().to_string();
    assert!(e.contains("`a.mp4` there, `b.mp4` here"), "{e}");
}
